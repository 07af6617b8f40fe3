"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for every recipe, and its sharded checkpoints.

``--fsdp`` shards each block (the ViT encoder's, decoder's, predictor's and an EMA teacher's blocks; ConvNeXt V2's
blocks) and then the whole model, so a rank holds 1/world of the weights,
gradients and AdamW moments, and gathers one block's weights at a time. With ``--amp bf16`` the gathered weights and
the compute are bf16 while the gradients are reduced and the optimizer steps in fp32 (``MixedPrecisionPolicy``).

Checkpoints of a sharded run are ``torch.distributed.checkpoint`` directories (``checkpoint.dcp/``): every rank
writes its shards; the run's position, RNG states and config sit beside them in ``meta.pt``. Such a checkpoint
loads on any number of processes, with or without ``--fsdp``, and ``python -m fastmim.train.convert`` turns it into
the ordinary single-file ``checkpoint.pt`` and ``encoder.safetensors``. A save goes to a temporary directory that is
renamed into place once every rank has written, as the single-file checkpoint's is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

META_NAME = "meta.pt"
# block methods called in place of ``forward`` (FSDP gathers a block's weights around these too)
FORWARD_METHODS = ("forward_fused", "forward_with_ffn", "call_with")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded each on its own, innermost first: the blocks (classes marked ``fsdp_unit``: the ViT's,
    in encoder, decoder, predictor and teacher; ConvNeXt V2's). Whatever else (embeddings, norms, heads, the sparse
    encoders' stems and downsampling layers) is gathered with the whole model."""
    units = [m for m in model.modules() if getattr(type(m), "fsdp_unit", False) and m is not model]
    depth = {m: len(name.split(".")) for name, m in model.named_modules()}
    return sorted(units, key=lambda m: -depth[m])


def shard_model(model: nn.Module, amp_dtype: torch.dtype | None) -> nn.Module:
    """Applies FSDP2 to ``model`` in place (per unit, then the root) and returns it; needs an initialised process
    group. ``amp_dtype`` bf16: bf16 weights gathered and computed with, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if amp_dtype == torch.float16:
        raise ValueError("--fsdp trains with --amp bf16 or none; fp16's gradient scaler is not sharded (use bf16)")
    # the recipes' outputs are (loss, prediction, mask) tuples that no caller modifies in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else None
    kw = {"mp_policy": mp} if mp is not None else {}
    for unit in shard_units(model):
        fully_shard(unit, **kw)
        for name in FORWARD_METHODS:
            if hasattr(unit, name):
                register_fsdp_forward_method(unit, name)
    fully_shard(model, **kw)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module):
    """FSDP2's counterpart of DDP's ``no_sync``: the micro-batches before an optimizer step's last keep their
    gradients unreduced."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


# --- checkpoints ---
def _state_dict_api():
    from torch.distributed.checkpoint import state_dict as api

    return api


def optimizer_fqn_state(optimizer: torch.optim.Optimizer, saved: dict, names: dict) -> dict:
    """An ``optimizer.state_dict()`` (keyed by parameter number) keyed by parameter name instead, the form
    ``torch.distributed.checkpoint.state_dict`` reads; ``names`` maps this optimizer's parameters to their names, and
    the saved numbering is the order of its groups' parameters."""
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    if len(order) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise ValueError("the checkpoint's optimizer does not fit this model's parameters")
    return {
        "state": {order[i]: st for i, st in saved["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def optimizer_numbered_state(optimizer: torch.optim.Optimizer, fqn: dict, names: dict) -> dict:
    """The inverse of ``optimizer_fqn_state``: a name-keyed optimizer state as ``optimizer.state_dict()`` numbers
    it."""
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    number = {n: i for i, n in enumerate(order)}
    return {
        "state": {number[n]: st for n, st in fqn["state"].items()},
        "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in fqn["param_groups"]],
    }


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state numbered as ``optimizer.state_dict()``), whole and on the CPU, from a sharded or
    plain model: a collective under FSDP (every rank calls it; rank 0 gets the tensors)."""
    api = _state_dict_api()
    opts = api.StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = api.get_state_dict(model, optimizer, options=opts)
    names = {p: n for n, p in model.named_parameters()}
    return msd, optimizer_numbered_state(optimizer, osd, names)


def full_model_state(model: nn.Module) -> dict:
    """The whole model state on the CPU of rank 0 (a collective under FSDP; the other ranks get an empty dict)."""
    api = _state_dict_api()
    return api.get_model_state_dict(model, options=api.StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict,
                    saved_names: list[str]) -> None:  # fmt: skip
    """Loads a whole (single-file checkpoint) model and optimizer state into a sharded or plain model;
    ``saved_names``: the names of the parameters the optimizer state numbers (``optim.saved_param_names``)."""
    from fastmim.train.optim import param_names, regroup_state

    api = _state_dict_api()
    names = {p: n for n, p in model.named_parameters()}
    have = set(model.state_dict())
    missing, unexpected = sorted(have - set(model_state)), sorted(set(model_state) - have)
    if missing or unexpected:  # another network: said as the model's keys (as a plain load does), not the optimizer's
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing[:4]}, unexpected keys "
                           f"{unexpected[:4]}")  # fmt: skip
    optim_state = regroup_state(optim_state, saved_names, optimizer, param_names(model, optimizer))
    api.set_state_dict(
        model, optimizer, model_state_dict=model_state,
        optim_state_dict=optimizer_fqn_state(optimizer, optim_state, names),
        options=api.StateDictOptions(full_state_dict=True),
    )  # fmt: skip


def save_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict, is_main: bool) -> None:
    """Writes ``path`` (a directory) from every rank: the shards by ``torch.distributed.checkpoint``, ``meta`` by rank
    0, into a temporary directory renamed onto ``path`` at the end; an interrupted save leaves the previous checkpoint
    (or, between the two renames, ``path.old``, which ``load_meta`` falls back to)."""
    import torch.distributed.checkpoint as dcp

    from fastmim.train.checkpoint import atomic_write, file_crc

    api = _state_dict_api()
    msd, osd = api.get_state_dict(model, optimizer)
    tmp = path.with_name(f".{path.name}.{meta['step']}.tmp")
    if is_main:  # what an interrupted save left (this step's or an earlier one's)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            shutil.rmtree(stale)
    _barrier()
    with _one_process_is_meant():
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp), no_dist=not _dist_on())
    _barrier()
    # each rank's files' CRC-32s (it just wrote them: from the page cache), checked before a load (load_dcp_into)
    rank = dist.get_rank() if _dist_on() else 0
    mine = {f.name: file_crc(f) for f in sorted(tmp.glob(f"__{rank}_*.distcp"))}
    crcs: dict[str, int] = {}
    for part in _all_gather(mine):
        crcs.update(part)
    if is_main:
        crcs.update(
            {f.name: file_crc(f) for f in tmp.iterdir() if f.is_file() and f.name not in crcs and f.name != META_NAME}
        )  # fmt: skip (files of another naming, .metadata)
        atomic_write(tmp / META_NAME, lambda f: torch.save({**meta, "shard_crc": crcs}, f))
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    _barrier()


def load_dcp_into(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                  shard_crc: dict[str, int] | None = None) -> None:  # fmt: skip
    """Loads a ``save_dcp`` checkpoint's weights and optimizer state into ``model`` (sharded or plain, on any number
    of processes) and ``optimizer``; its files are first read against the CRC-32s ``shard_crc`` (from its meta.pt)
    records, each rank a share of them."""
    import torch.distributed.checkpoint as dcp

    from fastmim.train.checkpoint import CorruptCheckpoint, check_files_crc
    from fastmim.train.preempt import StopRequested

    on = _dist_on()
    rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    problems = [p for part in _all_gather(check_files_crc(path, shard_crc, rank, world)) for p in part]
    if problems:
        raise CorruptCheckpoint(f"checkpoint {str(path)!r} is corrupt: {'; '.join(problems[:3])} (a damaged copy, "
                                "disk or shard); resume from an intact copy, or set FASTMIM_VERIFY_CHECKPOINT=0 to "
                                "load it as it is")  # fmt: skip

    api = _state_dict_api()
    msd, osd = api.get_state_dict(model, optimizer)
    # the parameters' state, by name; the groups are this optimizer's (a changed --decay-exempt moves parameters
    # between them: each keeps its own moments)
    state = {"model": msd, "optimizer": {"state": osd["state"]}}
    try:
        with _one_process_is_meant():
            dcp.load(state, checkpoint_id=str(path), no_dist=not _dist_on())
    except (KeyboardInterrupt, SystemExit, StopRequested):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException; it wraps each rank's error
        failures = getattr(e, "failures", None)  # {rank: (exception, its stack)}: the exceptions, not the stacks
        causes = [pair[0] for pair in failures.values()] if isinstance(failures, dict) and failures else [e]
        text = "; ".join(" ".join(f"{type(c).__name__}: {c}".split()) for c in causes[:2])
        if "Missing key" in text or "size mismatch" in text.lower():
            raise RuntimeError(text[:600]) from e  # a checkpoint of another network: Trainer.load_state_dict says so
        raise CorruptCheckpoint(f"sharded checkpoint {str(path)!r} cannot be read (a shard missing, truncated or "
                                f"damaged?): {text[:400]}") from None  # fmt: skip
    optim = {"state": state["optimizer"]["state"], "param_groups": osd["param_groups"]}
    api.set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim)


def dcp_dir(path: str | Path) -> Path | None:
    """The complete DCP checkpoint at ``path`` (or the ``.old`` one an interrupted save left), None if ``path`` is
    not a DCP checkpoint directory."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".old")):
        if p.is_dir() and (p / META_NAME).is_file():
            return p
    return None


def load_meta(path: Path) -> dict:
    """The run state saved beside a DCP checkpoint's shards (position, RNG states, config), with ``"dcp"``: its
    directory."""
    found = dcp_dir(path)
    if found is None:
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist")
        if dcp_dir(path / "checkpoint.dcp"):
            raise FileNotFoundError(f"{str(path)!r} is a run's folder: its sharded checkpoint is "
                                    f"{str(path / 'checkpoint.dcp')!r}")  # fmt: skip
        raise FileNotFoundError(f"{str(path)!r} is not a complete sharded checkpoint (no {META_NAME} in it)")
    from fastmim.train.checkpoint import ForeignCheckpointError, check_crc, safe_load

    check_crc(found / META_NAME)
    try:
        meta = safe_load(found / META_NAME)
    except ForeignCheckpointError:
        raise
    except Exception as e:
        raise RuntimeError(f"{str(found / META_NAME)!r} cannot be read ({e}); it may be truncated") from e
    return {**meta, "dcp": str(found)}


def init_single_process_group(device: torch.device) -> None:
    """A process group of one (FSDP needs one even alone): an in-memory store, no launcher needed."""
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)


@contextlib.contextmanager
def _one_process_is_meant():
    """Without a process group (a resume or a conversion on one process) DCP warns that it assumes one process:
    that is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
        yield


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_on() and dist.get_world_size() > 1:
        dist.barrier()


def _all_gather(obj) -> list:
    """Every rank's ``obj`` (pickled), in rank order; ``[obj]`` without a process group."""
    if not _dist_on() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
