"""wrap_ddp: the DDP wrapper of pretraining and fine-tuning."""

import os
import subprocess
import sys

import torch

from tests.conftest import ROOT

_SCRIPT = """
import os, sys, warnings, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
from fastmim.train.distributed import wrap_ddp
# a ConvNeXt block's depthwise conv on channels-last activations: the CPU backward gives its weight [C, 1, k, k] a
# gradient with another stride on the size-1 dimension (the same memory layout), which DDP compares exactly
m = torch.nn.Sequential(torch.nn.Conv2d(512, 512, 7, padding=3, groups=512), torch.nn.Conv2d(512, 4, 1))
d = torch.nn.parallel.DistributedDataParallel(m) if sys.argv[1] == "plain" else wrap_ddp(m, torch.device("cpu"))
with warnings.catch_warnings(record=True) as seen:
    if sys.argv[1] == "plain":
        warnings.simplefilter("always")
    d(torch.randn(2, 512, 3, 3).to(memory_format=torch.channels_last)).sum().backward()
print("WARNED" if any("Grad strides" in str(w.message) for w in seen) else "QUIET", flush=True)
del d
dist.destroy_process_group()
# (CI once saw this one-rank gloo process abort in interpreter teardown, after its answer: "terminate called without
# an active exception", a C++ thread left joinable; the answer is what is tested, so teardown is skipped)
os._exit(0)
"""


def test_the_cpu_size1_stride_false_alarm_is_not_shown(tmp_path):
    """Every ConvNeXt V2 (FCMAE) run under torchrun on CPU warned "Grad strides do not match bucket view strides"
    for a gradient whose memory layout is the parameter's; plain DDP still does here (the case is real)."""
    said = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for mode in ("plain", "wrapped"):
        r = subprocess.run([sys.executable, "-c", _SCRIPT, mode, str(tmp_path / mode)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        said[mode] = r.stdout.split()[-1]
    assert said == {"plain": "WARNED", "wrapped": "QUIET"}


def test_one_process_on_a_second_gpu_makes_it_the_current_device(monkeypatch):
    """--device cuda:1 without torchrun left GPU 0 current: Triton launches (which take the current device, not their
    tensors') would have run on GPU 0's stream with GPU 1's pointers. Checked with torch.cuda's calls stood in for."""
    from fastmim.train import distributed

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append(torch.device(d)))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info, device = distributed.init_distributed("cuda:1")
    assert device == torch.device("cuda", 1) and made_current == [device] and info.world_size == 1
    distributed.init_distributed("cpu")
    assert made_current == [device]  # (nothing made current for a CPU run)
