import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be on before triton is
# imported (torch does not import it; fastmim.ops imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests write the built-in sample folder into a temporary cache, never the user's. The processes they start
    keep their temporary files in the session's folder (TMPDIR), which pytest removes: torchrun's agent left an
    empty torchelastic_* folder in /tmp per launch (21 a run), a killed process its pymp-* folder. Compiled code
    stays cached where torch keeps it by default."""
    if "FASTMIM_CACHE" not in os.environ:
        os.environ["FASTMIM_CACHE"] = str(tmp_path_factory.mktemp("fastmim-cache"))
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # (torch's default is under the temporary folder)
        try:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir

            os.environ["TORCHINDUCTOR_CACHE_DIR"] = default_cache_dir()
        except ImportError:  # (another torch: its subprocesses' compiles are then cached for the session only)
            pass
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    yield


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


def make_image_folder(root: Path, n: int = 24, size=(80, 72), classes: int = 2, seed: int = 0) -> Path:
    """n random-but-structured RGB JPEGs in `classes` class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = size
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 7) % 256, ((xx + yy) * 2) % 256], -1)
        noise = rng.integers(0, 40, size=(h, w, 3))
        Image.fromarray(((base + noise) % 256).astype(np.uint8)).save(d / f"img{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


# Small but real: ViT-tiny encoder on a 4x4 grid with a one-block decoder. Seconds per run on 2 cores.
TINY_ARGS = [
    "--model", "mae_vit_tiny_patch16", "--img-size", "64", "--batch-size", "4", "--decoder-embed-dim", "64",
    "--decoder-depth", "1", "--decoder-num-heads", "2", "--num-workers", "0", "--warmup-epochs", "1",
    "--vis-interval", "1", "--device", "cpu", "--amp", "none",
]  # fmt: skip


def tiny_args_for(model: str) -> list[str]:
    """TINY_ARGS for another ViT recipe: ``model`` instead of MAE, without MAE's decoder flags."""
    args = list(TINY_ARGS)
    for flag in ("--decoder-embed-dim", "--decoder-depth", "--decoder-num-heads"):
        i = args.index(flag)
        del args[i : i + 2]
    args[args.index("--model") + 1] = model
    return args


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300, module: list[str] | None = None):
    """Runs `python -m fastmim.pretrain args` in a fresh process; returns CompletedProcess."""
    cmd = [sys.executable, *(module or ["-m", "fastmim.pretrain"]), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastmim.pretrain"]


def torchrun_clean_then_bad(args: list[str], root: Path, victim: Path, bad: bytes):
    """Under torchrun (2 processes, gloo): a clean run into ``root/clean``, then ``victim`` overwritten with ``bad``
    and the same run into ``root/cut``. Returns (the cut run's CompletedProcess, clean dir, cut dir)."""
    env = {"OMP_NUM_THREADS": "1"}
    clean, cut = root / "clean", root / "cut"
    r = run_cli([*args, "--output-dir", str(clean)], env=env, module=TORCHRUN_2)
    assert r.returncode == 0, r.stdout + r.stderr
    victim.write_bytes(bad)
    return run_cli([*args, "--output-dir", str(cut)], env=env, module=TORCHRUN_2), clean, cut


def torchrun_resume_equals(clean: Path, cut: Path, victim: Path, good: bytes, steps: int) -> None:
    """``victim`` restored, ``cut`` resumed under torchrun: its final weights equal the clean run's at ``steps``."""
    import torch

    from fastmim.train.checkpoint import load_checkpoint

    victim.write_bytes(good)
    r = run_cli(["--resume", "--output-dir", str(cut)], env={"OMP_NUM_THREADS": "1"}, module=TORCHRUN_2)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = load_checkpoint(clean / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["step"] == b["step"] == steps
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)


def assert_encoder_matches_timm(model, depth: int, img_size: int = 64, embed_dim: int = 192, num_heads: int = 3,
                                **timm_kwargs):  # fmt: skip
    """``model.encoder_state_dict()`` loads strictly into timm's VisionTransformer (``timm_kwargs``: e.g. no class
    token), which then computes the same features as ``model.forward_features``. Skips without timm (a test
    dependency)."""
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    enc = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size,
        patch_size=16,
        num_classes=0,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        **timm_kwargs,
    )
    enc.load_state_dict(model.encoder_state_dict(), strict=True)
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        np.testing.assert_allclose(enc.forward_features(x).numpy(), model.forward_features(x).numpy(), atol=1e-5)
