"""Command line: ``python -m fastmim.pretrain [--config FILE] [--flags]``; ``torchrun`` for several processes.

With no arguments it pretrains a small MAE on the built-in sample photos. Run ``--help`` for every option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import itertools
import json
import math
import os
import random
import re
import shlex
import sys
import time
from pathlib import Path

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # the options without torch's import (3 s)
    from fastmim.config import build_parser

    build_parser().parse_args(sys.argv[1:])  # (prints them and exits, as the full command's parse would)

import numpy as np
import torch

from fastmim._args import out_of_memory_summary, says_usage_errors
from fastmim.config import (
    EVERY_TOKEN_RECIPES,
    PATH_KEYS,
    PretrainConfig,
    apply_overrides,
    as_mapping,
    cli_overrides,
    encoder_options,
    expand_path,
    load_yaml,
    migrate_saved_config,
    save_yaml,
)
from fastmim.data.dali import DaliDecodeError
from fastmim.data.folder import BadImageError, absolute_data_path
from fastmim.train.checkpoint import (
    CHECKPOINT_NAME,
    DCP_NAME,
    ForeignCheckpointError,
    WriteError,
    clear_stale_temporaries,
    existing_run_markers,
    init_model_weights,
    load_checkpoint,
    read_init_weights,
    run_checkpoint,
)
from fastmim.train.compile_mode import compile_model, resolve_compile_mode
from fastmim.train.distributed import (
    DistInfo,
    broadcast_object,
    cleanup,
    gather_objects,
    init_distributed,
    wrap_ddp,
)
from fastmim.train.preempt import (
    REQUEUE_EXIT,
    Preempted,
    StopRequested,
    guard_output,
    stop_outside_training,
    stopped_status,
)
from fastmim.train.runlock import RunLock


class UsageError(Exception):
    """A problem with the user's input; printed without a traceback."""


class OutOfMemory(torch.cuda.OutOfMemoryError):
    """The training ran out of (GPU or host) memory; its message says how the run could fit. Printed without a
    traceback (exit status 1); an OutOfMemoryError (a RuntimeError) still, for callers of ``run`` that catch those."""


def _out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError that says so)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e)
    )


def out_of_memory_advice(cfg: PretrainConfig, device: torch.device, e: BaseException) -> str:
    """What ran out, at which settings, and the flags that make the run fit (the effective batch, and so the learning
    rate, kept where they can be)."""
    from fastmim.train.engine import resolve_amp

    said = out_of_memory_summary(e)
    # torch's own hint on fragmentation, when it gives one ("... try setting PYTORCH_CUDA_ALLOC_CONF=...") and it is
    # not set already
    hint = re.search(r"PYTORCH_CUDA_ALLOC_CONF=(\S+?)(?=[\s.,;]*$|\s)", str(e))
    alloc = hint.group(0) if hint and hint.group(1) not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") else None
    where = f"on {device}"
    if device.type == "cuda":
        try:
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            where += f" ({peak:.1f} GiB allocated at the peak of {total:.1f} GiB)"
        except Exception:  # (a driver that cannot say: the message stands without it)
            pass
    amp = resolve_amp(cfg.amp, device)
    settings = (f"--model {cfg.model}, --img-size {cfg.img_size}, --batch-size {cfg.batch_size} per process, "
                f"--accum-iter {cfg.accum_iter}, amp {'off' if amp is None else str(amp).removeprefix('torch.')}, "
                f"activation checkpointing {'on' if cfg.grad_ckpt else 'off'}")  # fmt: skip
    fixes = []
    if cfg.batch_size >= 2:
        half, before = cfg.batch_size // 2 * cfg.accum_iter * 2, cfg.batch_size * cfg.accum_iter
        same = "the same images per optimizer step, so the same learning rate" if half == before else \
            f"{half} images per process and optimizer step instead of {before}"  # fmt: skip
        fixes.append(f"--batch-size {cfg.batch_size // 2} --accum-iter {cfg.accum_iter * 2} ({same})")
    if not cfg.grad_ckpt:
        fixes.append("--grad-ckpt (the blocks' activations recomputed in the backward)")
    if amp is None and device.type == "cuda" and (torch.cuda.is_bf16_supported() or not cfg.fsdp):
        fixes.append("--amp bf16" if torch.cuda.is_bf16_supported() else "--amp fp16")  # (--fsdp refuses fp16)
    if alloc:
        fixes.append(f"{alloc} in the environment (torch's advice against fragmentation)")
    fix = "; ".join(fixes) if fixes else "a smaller --img-size or model"
    return (f"out of memory {where}: {said}\nsettings: {settings}\nto fit: {fix}. The last checkpoint, if any, is "
            "intact: run the same command with --resume and those flags to continue from it (under DALI, from a "
            "checkpoint saved at the end of an epoch)")  # fmt: skip


def _mapping_given(value) -> bool:
    """A model_args value that adds keys (a mapping or KEY=VALUE text), not one that clears them (none, null, "")."""
    return value is not None and not (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def _added_model_args(base, value):
    """``value`` of model_args on top of ``base``: their keys merged where both add keys, else ``value`` as it is
    (one that clears replaces)."""
    if _mapping_given(value) and _mapping_given(base):
        return {**as_mapping("model_args", base), **as_mapping("model_args", value)}
    return value


def resolve_config(argv: list[str] | None, origins: dict | None = None) -> tuple[PretrainConfig, dict | None]:
    """defaults < saved run config (when resuming) < --config YAML < flags. Returns (config, checkpoint or None);
    ``origins``, when given, is filled with where each set key came from (a flag, a file, the run's saved config).

    ``resume`` and ``output_dir`` may come from the YAML file or the flags; with ``resume: auto`` the checkpoint is
    ``output_dir/checkpoint.pt`` (or the sharded ``checkpoint.dcp/`` of an --fsdp run).
    """
    config_paths, flags = cli_overrides(argv)
    # each file's keys as that file sets them (model_args merged with the earlier files' up to it), paths expanded
    # as a shell would (~, $VAR: a YAML file is not a shell; values on the command line the shell has expanded)
    files, from_yaml, source = [], {}, {}
    for path in config_paths:
        data = {}
        for k, v in load_yaml(path).items():
            k = str(k).replace("-", "_")
            if k == "model_args":  # mappings merge, key by key
                v = _added_model_args(from_yaml.get(k), v)
            if k in PATH_KEYS and isinstance(v, str):
                v = expand_path(k, v, path)
            data[k] = v
        files.append((path, data))
        from_yaml.update(data)
        source.update(dict.fromkeys(data, path))
    if "model_args" in flags:  # --model-args adds keys to the files' (none clears)
        flags = {**flags, "model_args": _added_model_args(from_yaml.get("model_args"), flags["model_args"])}
    if isinstance(from_yaml.get("resume"), bool):  # `resume: true`: the bare --resume (the run in output_dir)
        from_yaml = {**from_yaml, "resume": "auto" if from_yaml["resume"] else None}
    given = {**{str(k).replace("-", "_"): v for k, v in from_yaml.items()}, **flags}
    cfg = PretrainConfig()
    state = None
    resume, out = given.get("resume"), given.get("output_dir")
    if resume is not None and not str(resume).strip():
        raise UsageError("--resume was given an empty path: name a checkpoint or a run's folder, or pass --resume "
                         "alone with --output-dir")  # fmt: skip
    if resume == "if-exists":  # a job's script: the same command starts the run and continues it after a requeue
        if not out:
            raise UsageError("--resume if-exists needs --output-dir (the run to start or continue)")
        if run_checkpoint(out) is None:
            lost = lost_checkpoint(out)
            if lost:
                raise UsageError(lost)
            if os.environ.get("RANK", "0") == "0":  # (before the process group: the launcher's rank; once)
                print(f"--resume if-exists: no checkpoint in {out} yet: starting the run there", flush=True)
            resume = None
            given = {**given, "resume": None}
        else:
            resume = "auto"
    if resume is not None and str(resume).lower() not in ("none", "null"):
        if resume == "auto":
            if not out:
                raise UsageError("--resume without a checkpoint path needs --output-dir (the run to continue)")
            ckpt_path = run_checkpoint(out)
            if ckpt_path is None:
                none = (f"no checkpoint to resume in {out} (for a job that may not have started yet, --resume "
                        "if-exists starts the run there when it has none)")  # fmt: skip
                raise UsageError(lost_checkpoint(out) or none)
            _say_other_checkpoint(ckpt_path)
        else:
            ckpt_path = _checkpoint_in(Path(resume))
        try:
            state = load_checkpoint(ckpt_path)
        except RuntimeError as e:  # a file that is not a checkpoint (or a truncated one): one line, not a traceback
            raise UsageError(f"--resume: {e}") from None
        except ForeignCheckpointError as e:  # (MAE's own checkpoints keep their argparse args beside the weights)
            raise UsageError(f"--resume: {e}; --resume continues a fastmim run: another code's weights start a new "
                             "run with --init-weights (it says how to save them alone)") from None  # fmt: skip
        lacks = [k for k in ("model", "optimizer", "step")
                 if not isinstance(state, dict) or ("dcp" not in state and k not in state)]  # fmt: skip
        if lacks:  # (another code's checkpoint: MAE's {"model": ...} failed on its 'optimizer' key as a "changed
            # --decoder-embed-dim")
            raise UsageError(f"--resume: {str(ckpt_path)!r} is not a fastmim checkpoint (it has no "
                             f"{', '.join(lacks)}): --resume continues a fastmim run; to start a new run from its "
                             f"weights, --init-weights {shlex.quote(str(ckpt_path))}")  # fmt: skip
        saved = {k: v for k, v in state.get("config", {}).items() if k not in ("resume", "output_dir")}
        saved = migrate_saved_config(saved, state.get("config_format"))
        cfg = apply_overrides(cfg, saved, f"the config saved in {ckpt_path}")
        if "model_args" in flags:  # a resume's --model-args add keys to the saved ones
            flags = {**flags, "model_args": _added_model_args(saved.get("model_args"), flags["model_args"])}
        given = {**given, "resume": str(ckpt_path), "output_dir": out or str(ckpt_path.parent)}
    for path, data in files:
        cfg = apply_overrides(cfg, {k: v for k, v in data.items() if k not in ("resume", "output_dir")}, path)
    run_keys = ("resume", "output_dir")
    run_source = "the command line" if any(k in flags for k in run_keys) else ", ".join(config_paths) or "resume"
    cfg = apply_overrides(cfg, {k: v for k, v in given.items() if k in run_keys}, run_source)
    cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if k not in run_keys}, "the command line")
    # data paths given now are kept absolute in the run's config: a resume from another directory (a job script's
    # cd) must read the same folder, not whatever that directory's relative path names
    for key in ("data_path", "eval_data", "init_weights"):
        value = getattr(cfg, key)
        if (key in flags or key in source) and isinstance(value, str) and value and not value.startswith("builtin:"):
            cfg = dataclasses.replace(cfg, **{key: absolute_data_path(value)})
    if state is not None:  # a recipe file changed since the run began (a requeue's same command) keeps its network
        cfg, kept = _keep_run_network(cfg, saved, {k: source[k] for k in source if k not in flags})
        source = {k: v for k, v in source.items() if k not in kept}
        cfg = _keep_run_init(cfg, saved)
    defaults = PretrainConfig().to_dict()  # (a saved default was not set by anyone: not named as where it came from)
    where = {k: "the run's saved config" for k, v in (saved if state is not None else {}).items()
             if v is not None and v != defaults.get(k)}  # fmt: skip
    # (a run's config.yaml passed back with --config holds resume: null: not where a --resume came from)
    where |= {k: str(v) for k, v in source.items() if not (k == "resume" and from_yaml.get(k) is None)}
    where |= dict.fromkeys(flags, "the command line")
    if "max_steps" in where and "max_steps" not in flags and cfg.max_steps is not None:
        if os.environ.get("RANK", "0") == "0":  # (a run's config.yaml keeps the --max-steps it was last given, and a
            # resume keeps it: a requeue stops where the run was planned to)
            print(f"note: max_steps {cfg.max_steps} comes from {where['max_steps']}: the run stops at step "
                  f"{cfg.max_steps} (--max-steps None trains the whole schedule)", flush=True)  # fmt: skip
    if origins is not None:
        origins.update(where)
    try:
        cfg.validate()
    except ValueError as e:  # where the bad value came from: a flag, the --config file, the run's saved config
        key = str(e).split(" ", 1)[0]
        raise ValueError(f"{e} (from {where[key]})" if key in where else str(e)) from None
    if state is not None:
        try:
            state["resume_changes"] = _check_resumed_settings(cfg, saved)
        except UsageError as e:  # a refused network change: say which file set it
            raise UsageError(with_origins(str(e), {k: v for k, v in where.items() if k in NETWORK_KEYS})) from None
    return cfg, state


# what the checkpoint's weights are shaped by: a resume cannot change them
NETWORK_KEYS = ("model", "img_size", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "layer_scale",
                "rel_pos_bias", "abs_pos")  # fmt: skip
# network settings whose default is a part left out (or an old run's): compared even when the run saved none
NETWORK_DEFAULTS = {"layer_scale": None, "rel_pos_bias": None, "abs_pos": "sincos"}
# what a resume continues with whatever it was (where the run is, how it reports): not a change of the training
RUN_KEYS = ("resume", "output_dir", "device", "num_workers", "max_steps", "log_interval", "vis_interval",
            "save_interval", "keep_every", "eval_data", "eval_every", "eval_pool", "init_weights")  # fmt: skip
CHANGES_FILE = "resumes.jsonl"  # a run's record of the settings each resume changed
# what a run from before an option existed did, where the option's default is not that: the torch loader (before
# --loader), torch.compile's default mode (before --compile-mode)
OLD_MEANING = {"loader": "torch", "compile_mode": "default"}


def _unused_settings(cfg: PretrainConfig, loader: str) -> list[str]:
    """Settings this run does not read, changed from their defaults (a flag or a config's): said, not refused, so
    that one config file serves runs with and without them."""
    default = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    said = []
    if cfg.crop == "simple" and cfg.crop_min != default["crop_min"]:  # (a recipe config's, under --crop simple)
        said.append(f"crop_min {cfg.crop_min} is not used: --crop simple takes the whole short side")
    if cfg.lr_schedule == "cosine":
        changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("lr_milestones", "lr_gamma")
                   if getattr(cfg, k) != default[k]]  # fmt: skip
        if changed:
            verb = "apply" if len(changed) > 1 else "applies"
            said.append(f"{' and '.join(changed)} {verb} to --lr-schedule multistep; this run's is cosine")
    else:
        if cfg.min_lr != default["min_lr"]:
            said.append(f"min_lr {cfg.min_lr} is not used: it is the cosine schedule's floor; this run's is multistep")
        late = [f"{t:g}" for t in cfg.milestone_epochs() if t >= cfg.epochs]
        if late:  # (a recipe's config tried on a short run)
            said.append(f"lr milestone {', '.join(late)} is not before the run's end (--epochs {cfg.epochs}): the lr "
                        "does not step there")  # fmt: skip
    if not cfg.eval_data:
        changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("eval_every", "eval_pool")
                   if getattr(cfg, k) != default[k]]  # fmt: skip
        if changed:
            verb = "apply" if len(changed) > 1 else "applies"
            said.append(f"{' and '.join(changed)} {verb} with --eval-data (the kNN monitor), which this run has not")
    if loader != "dali":
        changed = [f"--dali-device {cfg.dali_device}"] if cfg.dali_device != default["dali_device"] else []
        changed += ["--allow-unscanned"] if cfg.allow_unscanned else []
        if changed:
            verb = "apply" if len(changed) > 1 else "applies"
            said.append(f"{' and '.join(changed)} {verb} to the DALI loader; this run reads with {loader}")
    return said


def _say_other_checkpoint(chosen: Path) -> None:
    """A run that switched between --fsdp and not holds a checkpoint in each format: which one resumes, and why."""
    from fastmim.train.checkpoint import CHECKPOINT_NAME, DCP_NAME, saved_step
    from fastmim.train.fsdp import dcp_dir

    sharded = chosen.name != CHECKPOINT_NAME
    other = chosen.parent / CHECKPOINT_NAME if sharded else dcp_dir(chosen.parent / DCP_NAME)
    if other is None or not other.exists() or os.environ.get("RANK", "0") != "0":
        return
    mine, theirs = saved_step(chosen), saved_step(other)
    what = ("cannot be read" if theirs < 0 else f"step {theirs}, older" if theirs < mine
            else f"step {theirs}, the same step: the newer file is taken")  # fmt: skip
    print(f"note: {chosen.parent} holds {chosen.name} (step {mine}) and {other.name} ({what}; a run that switched "
          f"--fsdp, or a copied-in checkpoint): resuming from {chosen.name}", flush=True)  # fmt: skip


def _network_keys(cfg: PretrainConfig) -> list[str]:
    """The NETWORK_KEYS a resume compares: FCMAE's weights do not depend on the image size."""
    return [k for k in NETWORK_KEYS if not (k == "img_size" and cfg.model.startswith("fcmae_"))]


def _network_changes(cfg: PretrainConfig, saved: dict) -> tuple[list[str], dict]:
    """(the network settings ``cfg`` changes from the run's ``saved`` ones, the saved ones with NETWORK_DEFAULTS
    filled in). A saved None (the model's default) against a given value may be the same network (load_state_dict
    decides), but NETWORK_DEFAULTS are what they say, for a run from before them too."""
    saved = {**saved, **{k: v for k, v in NETWORK_DEFAULTS.items() if k not in saved}}
    changed = [k for k in _network_keys(cfg) if (saved.get(k) is not None or k in NETWORK_DEFAULTS)
               and getattr(cfg, k) != saved.get(k)]  # fmt: skip
    return changed, saved


def _keep_run_network(cfg: PretrainConfig, saved: dict, from_files: dict[str, str]) -> tuple[PretrainConfig, list]:
    """On a resume, a network setting (but the model) that only a --config file changes keeps the run's value, with a
    note: a recipe file updated since the run began must not stop its requeued job. A flag that changes one is
    refused (``_check_resumed_settings``), and so is another model, whatever else the file sets. A setting the run
    left unset (the model's default) stays unset. Returns (the config, the keys kept)."""
    _, saved = _network_changes(cfg, saved)
    if cfg.model != saved.get("model"):  # another network altogether: refused as a whole
        return cfg, []
    kept = [k for k in _network_keys(cfg) if k in from_files and getattr(cfg, k) != saved.get(k)]
    if kept and os.environ.get("RANK", "0") == "0":
        said = "; ".join(f"{from_files[k]} sets {k} {_cli_value(getattr(cfg, k))}, the run was trained with "
                         f"{_cli_value(saved.get(k), unset=True)}" for k in kept)  # fmt: skip
        print(f"note: {said}: the run continues with its own (a new run in another --output-dir takes the file's)",
              flush=True)  # fmt: skip
    return dataclasses.replace(cfg, **{k: saved.get(k) for k in kept}), kept


def _keep_run_init(cfg: PretrainConfig, saved: dict) -> PretrainConfig:
    """On a resume, another --vit-init changes nothing (the weights come from the checkpoint): the run keeps the one
    its weights were drawn with, so that its config.yaml (a new run from it, ``eval --random RUN``) still says it;
    a note says so. A run from before the option drew MAE's."""
    was = saved.get("vit_init") or "mae"
    if cfg.vit_init != was:
        if os.environ.get("RANK", "0") == "0":
            print(f"note: --vit-init {cfg.vit_init} changes nothing in a resumed run (its weights come from the "
                  f"checkpoint): it keeps vit_init {was}, which its weights were drawn with; a new run in another "
                  "--output-dir takes another", flush=True)  # fmt: skip
        cfg = dataclasses.replace(cfg, vit_init=was)
    return cfg


def _unchanged_defaults(changes: dict, cfg: PretrainConfig, model: torch.nn.Module, state: dict) -> dict:
    """A resume's changes less those that only name what an unset setting stood for: a --mask-ratio equal to the
    model's default, an --lr equal to the blr x effective batch / 256 the run had."""

    out = dict(changes)
    if "mask_ratio" in out and out["mask_ratio"][0] is None:
        for cls in type(model).__mro__:  # (A2MIM's and PixMIM's pass **kwargs on: their base's default)
            default = inspect.signature(cls.__init__).parameters.get("mask_ratio")
            if default is not None:
                if default.default == out["mask_ratio"][1]:
                    del out["mask_ratio"]
                break
    if "lr" in out and out["lr"][0] is None:
        was = {k: out[k][0] if k in out else getattr(cfg, k) for k in ("blr", "batch_size", "accum_iter")}
        lr = was["blr"] * was["batch_size"] * was["accum_iter"] * state.get("world_size", 1) / 256
        if math.isclose(lr, out["lr"][1], rel_tol=1e-9):
            del out["lr"]
    return out


def _cli_value(value, unset: bool = False) -> str:
    return ("its default (unset)" if unset else "none") if value is None else str(value)


def _target_of(model_args) -> str:
    """The target ``model_args`` choose (``fastmim.targets.choice``; the recipes' default when they name none)."""
    from fastmim.targets.choice import TargetChoice

    args = as_mapping("model_args", model_args) if _mapping_given(model_args) else {}
    return str(args.get("target", TargetChoice.target))


def _check_resumed_settings(cfg: PretrainConfig, saved: dict) -> dict:
    """A resume that changes the network is refused naming what the run was trained with; any other changed setting
    (flags override the saved config, by design: masks, data, loss, optimizer, augmentation, precision) is said in a
    note and returned as {key: [before, after]}, which the run appends to its resumes.jsonl."""
    changed, saved = _network_changes(cfg, saved)
    if changed:
        was = ", ".join(f"{k} {saved.get(k)}" if saved.get(k) is not None else f"no {k}" for k in changed)
        now = ", ".join(f"--{k.replace('_', '-')} {'none' if getattr(cfg, k) is None else getattr(cfg, k)}"
                        for k in changed)  # fmt: skip
        back = [f"--{k.replace('_', '-')} {saved[k] if saved[k] is not None else 'none'}" for k in changed
                if k in NETWORK_DEFAULTS and saved[k] == NETWORK_DEFAULTS[k]]  # fmt: skip
        back = f" ({', '.join(back)})" if back else ""
        raise UsageError(f"--resume: this run was trained with {was}; {now} would change the network its checkpoint "
                         f"holds: drop them{back} to continue the run, or start another in a new "
                         "--output-dir")  # fmt: skip
    was_target, now_target = _target_of(saved.get("model_args")), _target_of(cfg.model_args)
    if was_target != now_target:  # another recipe on the same weights' shapes (lowpass and pixels): refused as --model
        now = (f"--model-args target={now_target}" if now_target != _target_of(None) else
               f"model_args without a target ({now_target})")  # fmt: skip
        raise UsageError(f"--resume: this run was trained with target={was_target}; {now} would change what it "
                         f"learns: add --model-args target={was_target} to continue the run, or start another in a new "
                         "--output-dir")  # fmt: skip
    same = set(RUN_KEYS) | set(_network_keys(cfg))  # (FCMAE's image size is data: a change is said)
    # a setting the run's fastmim did not have yet ran as its default (each new option's default is the old behaviour)
    # but for the options whose default is a choice made later (OLD_MEANING)
    fields = dataclasses.fields(PretrainConfig)
    absent = {f.name: f.default for f in fields if f.name not in saved and f.default is not dataclasses.MISSING}
    saved = absent | {k: v for k, v in OLD_MEANING.items() if k in absent} | saved

    def differs(k) -> bool:
        now, was = getattr(cfg, k), saved[k]
        if k == "data_path" and isinstance(was, str) and isinstance(now, str) and not was.startswith("builtin:"):
            return now != was and os.path.abspath(was) != now  # (a run from before data paths were kept absolute
            # saved it as given: the same folder named again from the same place is no change)
        return now != was

    if not (cfg.compile or saved.get("compile")):
        same.add("compile_mode")  # read with --compile only: no change without it
    return {k: [saved[k], getattr(cfg, k)] for k in cfg.to_dict() if k in saved and k not in same and differs(k)}


def _implied(key: str, before, after, cfg: PretrainConfig, trainer=None) -> str:
    """What a changed setting changes with it, unsaid otherwise: the resize filter of a crop whose filter is unset;
    the weight-decay groups, not the optimizer's state, for --decay-exempt; the learning rate from here, for --epochs
    (the schedule is re-planned over the new count: a finished cosine rises again)."""
    if key == "epochs" and trainer is not None and isinstance(before, int) and cfg.lr_schedule == "cosine":
        step = trainer.pos.step
        was, now = trainer.lr_of(step, epochs=before), trainer.lr_of(step)
        if not math.isclose(was, now, rel_tol=1e-3):
            return (f" (the lr schedule is re-planned over {after} epochs: step {step + 1}'s lr goes {was:.3g} -> "
                    f"{now:.3g}{', back up' if now > was else ''})")  # fmt: skip
    if key == "decay_exempt":
        return " (from here: parameters change weight-decay group, each keeping its AdamW moments)"
    if key == "crop" and cfg.crop_interp is None:
        from fastmim.data.transforms import crop_interp

        was, now = crop_interp(before), crop_interp(after)
        return f" (and with it the filter, {was} -> {now})" if was != now else ""
    return ""


def _setting_text(key: str, value, model: str | None = None) -> str:
    """A setting as the resume note says it: an unset one is the default it stood for, not "None" (a mask ratio: the
    recipe's own)."""
    if value is not None:
        return str(value)
    if key == "mask_ratio" and model is not None:
        from fastmim.models.registry import recipe_default

        default = recipe_default(model, "mask_ratio")
        if isinstance(default, int | float):
            return f"unset (the model's, {default:g})"
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(PretrainConfig)}
    meant = re.search(r"None: ([^();]*)", helps.get(key, ""))  # each option's help says what unset means
    return f"unset ({meant.group(1).strip()})" if meant else "unset"


def _remove_empty(out: Path, top: Path | None) -> None:
    """Removes ``out`` and its parents up to ``top`` (inclusive) while they are empty folders; nothing when ``top`` is
    None (the folders existed before) or not ``out`` or one of its parents."""
    if top is None or not (out == top or top in out.parents):
        return
    for d in (out, *out.parents):
        if not d.is_dir() or any(d.iterdir()):
            return
        d.rmdir()
        if d == top:
            return


def _checkpoint_in(path: Path) -> Path:
    """--resume PATH: a checkpoint file, a sharded checkpoint's folder, or a run's folder (its newest checkpoint)."""
    from fastmim.train.fsdp import dcp_dir

    if path.suffix == ".safetensors":
        raise UsageError(f"--resume {str(path)!r} is an exported encoder, not a training checkpoint: resume from the "
                         f"run's folder ({str(path.parent)!r}) or its checkpoint.pt")  # fmt: skip
    if path.is_dir() and dcp_dir(path) is None:  # not a sharded checkpoint itself: a run's folder?
        found = run_checkpoint(path)
        if found is None:
            raise UsageError(f"--resume {str(path)!r}: no checkpoint in that folder (checkpoint.pt or checkpoint.dcp/)")
        _say_other_checkpoint(found)
        return found
    return path


UNFINISHED_EXTRAS = ("reconstructions", "training.png", CHANGES_FILE)  # files a run may write before its first save


def lost_checkpoint(out: str | Path) -> str | None:
    """The error for a run folder whose run saved (its encoder.safetensors is written after each checkpoint) but whose
    checkpoint is gone or incomplete (deleted to save space, copied in part): None when it has no such encoder. Such a
    folder is neither resumed nor started afresh over: either would lose or overwrite the run's outputs."""
    from fastmim.train.checkpoint import SNAPSHOT_GLOB
    from fastmim.train.fsdp import META_NAME

    out = Path(out)
    encoder = out / "encoder.safetensors"
    if not encoder.is_file():  # (--keep-every's snapshots left when the rest was deleted to save space: the newest)
        encoder = max((p for p in out.glob(SNAPSHOT_GLOB) if p.is_file()), default=None)
        if encoder is None:
            return None
    try:
        from safetensors import safe_open

        with safe_open(str(encoder), "pt") as f:
            step = f" (step {(f.metadata() or {})['step']})"
    except Exception:
        step = ""
    dcp = out / DCP_NAME
    why = (f"{DCP_NAME}/ has no {META_NAME} (copied or written in part?)" if dcp.is_dir() else
           f"neither {CHECKPOINT_NAME} nor {DCP_NAME}/ is there (deleted, or not copied?)")  # fmt: skip
    return (f"output directory {str(out)!r} holds a trained run's {encoder.name}{step} but no checkpoint to "
            f"resume: {why}. Restore the checkpoint to resume it, or choose another --output-dir. Nothing was "
            "changed.")  # fmt: skip


def prepare_output_dir(cfg: PretrainConfig, info: DistInfo) -> tuple[Path, RunLock | None]:
    """Creates the run directory, refusing one that already holds a run unless resuming it, and one another process
    writes in; returns it and rank 0's lock on it (``RunLock``: release it when the run ends).

    Rank 0 decides and tells the others, so a slow rank never mistakes rank 0's fresh files for an old run.
    """
    out = cfg.output_dir or f"output/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(broadcast_object(out, info))
    error = lock = None
    there = next((p for p in (out, *out.parents) if p.exists()), None) if info.is_main else None
    if there is not None and not there.is_dir():  # (mkdir's "[Errno 20] Not a directory" named neither)
        error = f"output path {str(out)!r} " + ("exists and is not a directory" if there == out else
                                                f"is under {str(there)!r}, a file, not a directory")  # fmt: skip
    elif info.is_main:
        made = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)  # (the lock's place; removed again if the run is refused)
        lock, taken = RunLock(out, f"run {cfg.model}"), False
        try:  # (a refusal, or a Ctrl-C / stop signal / failed rename while it reads the folder: let go of it)
            error = lock.acquire() or _check_output_dir(cfg, out, lock.held)
            taken = not error
        finally:
            if not taken:
                lock.release()
                _remove_empty(out, made[-1] if made else None)
    try:
        error = broadcast_object(error, info)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if error:
        raise UsageError(error)
    return out, lock


def _check_output_dir(cfg: PretrainConfig, out: Path, locked: bool) -> str | None:
    """Rank 0's part of ``prepare_output_dir``: why ``out`` cannot take this run, or None. It removes the temporary
    files of a save killed mid-write (kill -9, a launcher's timeout: each a checkpoint's size): under the folder's
    lock (``locked``) no save is under way, so also when the run is refused; unlocked (a file system without locks),
    only for a run that starts there."""
    if locked:
        clear_stale_temporaries(out)
    markers = existing_run_markers(out)
    resuming_here = cfg.resume is not None and Path(cfg.resume).resolve().parent == out.resolve()
    unfinished = bool(markers) and run_checkpoint(out) is None and not resuming_here
    if unfinished:
        error = lost_checkpoint(out)  # a run that saved, its checkpoint since lost: untouched
        if error:
            return error
        # a run that died before its first checkpoint: nothing to resume; its files are kept aside, not deleted
        stamp = time.strftime("%Y%m%d-%H%M%S")
        names = (out / f"unfinished-{stamp}{f'-{n}' if n > 1 else ''}" for n in itertools.count(1))
        aside = next(p for p in names if not p.exists())
        aside.mkdir()
        markers += [m for m in UNFINISHED_EXTRAS if (out / m).exists()]  # what it may have written before
        for m in markers:  # (a sharded checkpoint without its meta.pt is an unfinished save)
            (out / m).rename(aside / m)
        print(f"{out} held a run that stopped before its first checkpoint; its {', '.join(markers)} moved to "
              f"{aside.name}/, starting afresh", flush=True)  # fmt: skip
        markers = []
    if markers and not resuming_here:
        how = (f"the resume of {cfg.resume} would write over it: resume in that run's own folder, or choose an "
               "empty --output-dir" if cfg.resume is not None else  # (a resume of another run into this one)
               "pass --resume to continue it, or choose another --output-dir")  # fmt: skip
        return f"output directory {str(out)!r} already holds a run ({', '.join(markers)}); {how}. Nothing was " \
            "overwritten."  # fmt: skip
    if not locked:
        clear_stale_temporaries(out)
    return None


def with_builtin_data(cfg: PretrainConfig) -> PretrainConfig:
    """The config with a ``builtin:NAME`` data path (``builtin:digits``: labelled, for evaluation too) made the
    folder's path; the run keeps the name in its config, so it resumes on any machine."""
    from fastmim.data.samples import resolve_data_path

    try:
        return dataclasses.replace(cfg, data_path=resolve_data_path(cfg.data_path))
    except (RuntimeError, ValueError) as e:  # an unknown name, or the package that holds the data is missing
        raise UsageError(str(e)) from e


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX; oneDNN also counts plain AVX-512, which
    emulates them slowly); None if that cannot be asked."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return None


def _note_cpu_autocast(amp_dtype: torch.dtype) -> None:
    """A CPU run under autocast: fp16 (its loss scaling is for GPUs) and bf16 on a CPU without bf16 instructions
    run several times slower than fp32 (measured about 10x on a 2-core AVX2 VM); the configs' bf16 is for GPUs."""
    if amp_dtype == torch.float16:
        also = "bf16 or none" if cpu_has_bf16() else "none"
        print("note: --amp fp16 on the CPU runs several times slower than fp32 (its loss scaling is for GPUs; it runs "
              f"here for tests): use --amp {also}", flush=True)  # fmt: skip
    elif cpu_has_bf16() is False:
        print(f"note: --amp bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no bf16 instructions) runs "
              "several times slower than fp32 (a config's bf16 autocast is for GPUs): add --amp none to try it "
              "here", flush=True)  # fmt: skip


def build_monitor(cfg: PretrainConfig, info: DistInfo, device: torch.device):
    """--eval-data: the kNN monitor (rank 0 holds it; every rank checks the path, so a bad one stops them all)."""
    if not cfg.eval_data:
        return None
    from fastmim.eval.monitor import KnnMonitor, labelled_split

    try:
        labelled_split(cfg.eval_data)
        if not info.is_main:
            return None
        return KnnMonitor(cfg.eval_data, cfg.model, cfg.img_size, device, pool=cfg.eval_pool,
                          workers=min(cfg.num_workers or 0, 8), vit=encoder_options(cfg.to_dict()),
                          skip_bad=cfg.skip_bad_files)  # fmt: skip
    except BadImageError as e:  # (a RuntimeError, from a loader worker with its traceback: the line naming the file)
        raise UsageError(f"--eval-data {cfg.eval_data!r}: {e.summary()}; replace or remove it, or run with "
                         "--skip-bad-files (the monitor then leaves it out)") from e  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UsageError(str(e) if "--eval-data" in str(e) else f"--eval-data {cfg.eval_data!r}: {e}") from e


def build_dataset(cfg: PretrainConfig, root: str | None = None):
    from fastmim.data import ImageFolderDataset, default_dataset_path, pretrain_transform
    from fastmim.data.folder import TarShardDataset, list_tar_shards

    root = root or cfg.data_path or default_dataset_path()
    try:
        kind = TarShardDataset if list_tar_shards(root) else ImageFolderDataset
        return kind(
            root, pretrain_transform(cfg.img_size, cfg.crop_min, cfg.hflip, cfg.crop, cfg.crop_interp), seed=cfg.seed
        )
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise UsageError(str(e)) from e


def check_same_data(dataset, info: DistInfo, problem: Exception | None = None) -> None:
    """Under torchrun every rank must read the same samples: a node whose copy of the folder differs, or that reads
    its own out-of-date scan list, would deal other epochs (another length: the ranks' collectives fall out of step).
    Refused on every rank, naming the first that differs. ``problem``: this rank's failure to set up its data (a
    folder missing on its node), raised here on every rank at once rather than on this one alone, which would leave
    the others waiting in their next collective."""
    if not info.enabled:
        if problem is not None:
            raise problem
        return
    from fastmim.data.folder import dataset_digest

    if problem is not None:
        said = str(problem) if isinstance(problem, UsageError) else f"{type(problem).__name__}: {problem}"
        gather_objects((None, None, said), info)
        raise problem
    seen = gather_objects((len(dataset), dataset_digest(dataset), None), info)
    failed = [r for r, v in enumerate(seen) if v[2] is not None]
    if failed:
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise UsageError(f"rank {failed[0]}{more} could not set up its data: {seen[failed[0]][2]}")
    differ = [r for r, v in enumerate(seen) if v != seen[0]]
    if differ:
        r = differ[0]
        raise UsageError(
            f"the ranks read different data: rank 0 has {_n(seen[0][0], 'image')} (names digest {seen[0][1]}), rank "
            f"{r} {_n(seen[r][0], 'image')} (digest {seen[r][1]}); {len(differ)} of {info.world_size} ranks differ "
            "from rank 0. Every node must hold the same files (the same names below the data folder: a node's copy "
            "still being written? its own out-of-date scan list in an unshared cache: set FASTMIM_CACHE to a shared "
            "folder)"
        )


def choose_loader(
    cfg: PretrainConfig, device: torch.device, state: dict | None = None, info: DistInfo | None = None
) -> tuple[str, str | None, str]:
    """(loader, data root to read, why): "dali" reads a scanned file list (given, or the folder's up-to-date scan;
    the built-in photos need none), "torch" and "torch-gpu" the folder or list as given; "auto" takes DALI where it
    can, else on a CUDA run "torch-gpu" when torchvision decodes JPEGs there, else "torch". A resumed ``state`` that
    a torch loader saved mid-epoch keeps a torch loader (DALI would read other samples for the rest of the epoch).
    Under torchrun (``info``) rank 0 looks at the data and the others take its answer: the scan's check stats every
    file (about 10 s for 1.28M on a local disk; a shared file system's metadata server would take it from every
    process), and every rank must read with the same loader."""
    kind, root, why = _choose_loader_on_rank0(cfg, info)
    saved = (state or {}).get("loader")
    saved_dali = bool(saved) and isinstance(saved[0], dict) and "dali" in saved[0]
    if kind == "dali" and cfg.loader == "auto" and (state or {}).get("batch", 0) and not saved_dali:
        why = "the run read with a torch loader and stopped mid-epoch: DALI would read other samples for the rest of it"
        kind, root = "torch", cfg.data_path
    if kind == "torch" and cfg.loader == "auto" and device.type != "cuda":
        return kind, root, f"{why}; not torch-gpu: this run is on {device}, GPU decoding needs CUDA"
    if kind != "torch" or cfg.loader != "auto" or device.type != "cuda":
        return kind, root, why
    from fastmim.data.gpu_decode import gpu_decode_problem

    problem = gpu_decode_problem(device)
    if problem:
        return "torch", root, f"{why}; JPEGs decoded by the loader processes: {problem}"
    return "torch-gpu", root, f"{why}; JPEGs decoded on the GPU (torchvision's nvJPEG)"


def _check_loader_on_resume(cfg: PretrainConfig, state: dict | None, kind: str, why: str) -> None:
    """A run that read with DALI (its checkpoint holds DALI's reader state) and that --loader auto would now give to
    another loader (its folder's scan went out of date: a file was touched or added): refused mid-epoch with what to
    do (the other loader would read other samples, and the dataset's size may differ), noted at an epoch boundary."""
    saved = (state or {}).get("loader")
    was = ((state or {}).get("provenance") or {}).get("loader")  # (recorded since: the torch loaders too)
    if was is None and state is not None and "provenance" not in state and not saved:
        was = "torch"  # (an earlier fastmim's checkpoint without DALI's state: a torch loader read it)
    if cfg.loader != "auto" or kind == "dali" or not (saved and isinstance(saved[0], dict) and "dali" in saved[0]):
        switched = cfg.loader == "auto" and was is not None and was != kind
        if switched and not (state or {}).get("batch", 0) and not _rank_prefix():  # (rank 0 says it)
            order = " and its order" if "dali" in (was, kind) else ""
            print(f"note: this run read its data with the {was} loader; --loader auto now picks {kind} ({why}): the "
                  f"crops{order} differ from here on; --loader {was} keeps the run's", flush=True)  # fmt: skip
        return
    data = shlex.quote(cfg.data_path) if cfg.data_path else "DATA_PATH"
    # the data's scan went out of date (not: DALI missing, --skip-bad-files, bad images found, which a new scan keeps)
    stale = "not been scanned" in why or "no up-to-date scan" in why
    fix = f"scan the data again (python -m fastmim.data.scan {data})" if stale else "resume with --loader dali"
    if state.get("batch", 0):
        todo = f"{fix} and resume: DALI then reads the new scan" if stale else f"{fix} where DALI can run"
        raise UsageError(f"this run read its data with DALI and stopped mid-epoch, but --loader auto now picks {kind}: "
                         f"{why}. To go on: {todo} (or resume with --loader torch from an end-of-epoch "
                         "checkpoint)")  # fmt: skip
    print(f"note: this run read its data with DALI; --loader auto now picks {kind} ({why}); to go on with DALI, "
          f"{fix}", flush=True)  # fmt: skip


def _choose_loader_on_rank0(cfg: PretrainConfig, info: DistInfo | None) -> tuple[str, str | None, str]:
    """``_choose_loader``'s answer on rank 0, given to every rank (its usage error raised on every rank too)."""
    if info is None or not info.enabled:
        return _choose_loader(cfg)
    answer = None
    if info.is_main:
        try:
            answer = _choose_loader(cfg)
        except UsageError as e:
            answer = e
        except BaseException as e:  # (told to the others, so that they do not wait for an answer that never comes;
            # a stop signal or Ctrl-C as itself, so that every rank exits as a stop does)
            relay = e if not isinstance(e, Exception) else RuntimeError(
                f"rank 0 failed choosing the data loader: {type(e).__name__}: {e}")  # fmt: skip
            with contextlib.suppress(Exception):
                broadcast_object(relay, info)
            raise
    answer = broadcast_object(answer, info)
    if isinstance(answer, BaseException):
        raise answer
    kind, root, why = answer
    if kind == "dali" and root and root != cfg.data_path and not os.path.exists(root):
        raise UsageError(f"rank {info.rank}: rank 0 reads the data with DALI through the folder's scan list {root}, "
                         "which this machine does not have (its fastmim cache is not rank 0's): set FASTMIM_CACHE to "
                         "a folder every machine shares, or pass the list itself as --data-path from a shared "
                         "folder")  # fmt: skip
    return kind, root, why


# what --allow-unscanned risks: DALI cannot skip a file it cannot decode, and its CPU decoder (libjpeg-turbo) decodes
# a truncated JPEG as far as it goes, logging an error, and hands that on
_UNSCANNED = "a bad image stops the run, or one cut short is trained on as far as it decodes"


def _choose_loader(cfg: PretrainConfig) -> tuple[str, str | None, str]:
    """The choice between DALI and the torch loader (``choose_loader`` then decodes on the GPU where it can)."""
    from fastmim.data.dali import dali_problem

    if cfg.loader in ("torch", "torch-gpu"):
        return cfg.loader, cfg.data_path, f"--loader {cfg.loader}"
    if cfg.skip_bad_files and cfg.loader == "dali":
        raise UsageError("--skip-bad-files needs --loader torch or torch-gpu: DALI cannot skip a sample (scan the "
                         "data with python -m fastmim.data.scan instead: DALI reads only the good files)")  # fmt: skip
    if cfg.skip_bad_files and cfg.loader == "auto":
        return "torch", cfg.data_path, "--skip-bad-files (DALI cannot skip a sample)"
    why_not = dali_problem()
    if why_not:
        if cfg.loader == "dali":
            raise UsageError(f"--loader dali: {why_not}")
        return "torch", cfg.data_path, "DALI is not installed (pip install 'fastmim[dali]')"
    if cfg.data_path is None:
        return "dali", None, "the built-in photos"
    from fastmim.data.folder import list_tar_shards
    from fastmim.data.scan import find_scan

    try:
        shards = list_tar_shards(cfg.data_path)
    except (FileNotFoundError, ValueError) as e:  # a pattern of shards that names none, or a missing one
        raise UsageError(str(e)) from e
    quoted = shlex.quote(cfg.data_path)  # (a pattern of shards is passed in quotes)
    if shards:  # DALI reads every sample of a shard: only a clean scan of every one clears them
        from fastmim.data.scan import scanned_bad

        bad = scanned_bad(shards)
        if bad == 0:
            return "dali", cfg.data_path, f"webdataset tar shards, {_n(len(shards), 'shard')} scanned clean"
        if cfg.allow_unscanned:
            return "dali", cfg.data_path, f"webdataset tar shards, --allow-unscanned ({_UNSCANNED})"
        problem = (
            f"the scan found {bad} bad image(s) in them, and DALI reads every sample of a shard: rewrite the shards "
            "without them (python -m fastmim.data.scan lists them)"
            if bad
            else f"they have not been scanned (or changed since): run python -m fastmim.data.scan {quoted}"
        )
        if cfg.loader == "dali":
            raise UsageError(f"--loader dali: {cfg.data_path!r} holds tar shards; {problem}, or pass --allow-unscanned")
        return "torch", cfg.data_path, f"tar shards not cleared for DALI: {problem}"
    path = Path(cfg.data_path)
    if path.is_file():
        return "dali", cfg.data_path, "a scanned file list"
    if path.is_dir():
        scan = find_scan(path)
        if scan is not None:
            from fastmim.data.scan import scan_format, scan_header

            bad = scan_header(scan)[2]
            left = f", which leaves out the {_n(bad, 'bad image')} it found" if bad else ""
            if scan_format(scan) == "v1":
                left += (" (an earlier fastmim's scan: checked by file count and newest time only; scan again for "
                         "the check of every file's size and time)")  # fmt: skip
            return "dali", str(scan), f"the folder's up-to-date scan {scan}{left}"
        if cfg.allow_unscanned:
            return "dali", cfg.data_path, f"--allow-unscanned ({_UNSCANNED})"
        if cfg.loader == "dali":
            raise UsageError(
                f"--loader dali: {cfg.data_path!r} has not been scanned (or changed since): a DALI pipeline stops at "
                f"the first bad image. Run python -m fastmim.data.scan {quoted} first, or pass "
                "--allow-unscanned"
            )
        return "torch", cfg.data_path, "the folder has no up-to-date scan for DALI (python -m fastmim.data.scan)"
    return "torch", cfg.data_path, "the data path is neither a folder nor a file"  # build_dataset names the problem


def build_loader(cfg: PretrainConfig, kind: str, dataset, masks, info: DistInfo, device: torch.device):
    """(loader, sampler, description) for the trainer: DALI's loader is its own sampler."""
    from fastmim import _ext
    from fastmim.data import build_pretrain_loader, default_num_workers, usable_cpus

    if kind == "dali":
        from fastmim.data.dali import DaliLoader

        dali_device = cfg.dali_device
        if dali_device == "auto":
            dali_device = "mixed" if device.type == "cuda" else "cpu"
        if dali_device == "mixed" and device.type != "cuda":
            raise UsageError("--dali-device mixed decodes on the GPU: it needs a CUDA run (--device cuda)")
        # --num-workers: DALI's CPU threads (at least one: DALI has no in-process mode)
        threads = (
            max(1, cfg.num_workers) if cfg.num_workers is not None else max(1, usable_cpus() // info.local_world_size)
        )
        try:
            loader = DaliLoader(dataset.files, cfg.batch_size, cfg.img_size, device=dali_device,
                                device_id=device.index if device.type == "cuda" else None, rank=info.rank,
                                world_size=info.world_size, seed=cfg.seed, num_threads=threads,
                                scale=(cfg.crop_min, 1.0), hflip=cfg.hflip, crop=cfg.crop,
                                crop_interp=cfg.crop_interp, tars=getattr(dataset, "shards", None),
                                tar_sizes=getattr(dataset, "sizes", None),
                                interp="cubic" if cfg.crop_interp == "bicubic" else "auto")  # fmt: skip
        except ValueError as e:
            raise UsageError(str(e)) from e
        shrink = ""
        if loader.filters[0] != "cubic" and cfg.crop_interp is None and loader.filters[1] == "cubic":
            shrink = (
                "; bicubic crops shrunk with the linear filter on CPU threads, about 1.2x faster: --crop-interp bicubic"
            )
        return loader, loader, f"DALI ({dali_device}, {_n(threads, 'thread')}{shrink})"
    workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(info.local_world_size)
    # masks with a C++ generator are drawn in the loader workers; the others on the training device
    worker_masks = masks if masks.has_cpp and _ext.available() else None
    skipping = ", skipping unreadable files" if cfg.skip_bad_files else ""
    if kind == "torch-gpu":
        from fastmim.data.gpu_decode import EncodedImages, GpuDecodeLoader, collate_encoded, gpu_decode_problem

        problem = gpu_decode_problem(device) if device.type == "cuda" else None
        if problem:
            raise UsageError(f"--loader torch-gpu: {problem}; use --loader torch")
        encoded, sampler = build_pretrain_loader(
            EncodedImages(dataset), cfg.batch_size, workers, info.rank, info.world_size, cfg.seed, masks=worker_masks,
            skip_bad=cfg.skip_bad_files, collate_images=collate_encoded,
        )  # fmt: skip
        loader = GpuDecodeLoader(encoded, dataset, device, cfg.img_size, cfg.skip_bad_files, cfg.seed)
        where = "nvJPEG" if device.type == "cuda" else "on the CPU: this run has no GPU"
        return loader, sampler, f"torch-gpu ({_n(workers, 'worker')} read, decoding {where}{skipping})"
    loader, sampler = build_pretrain_loader(
        dataset, cfg.batch_size, workers, info.rank, info.world_size, cfg.seed, pin_memory=device.type == "cuda",
        masks=worker_masks, skip_bad=cfg.skip_bad_files,
    )  # fmt: skip
    return loader, sampler, f"torch ({_n(workers, 'worker')}{skipping})"


def build_model(cfg: PretrainConfig, device: torch.device):
    """The recipe named by cfg.model (mae_*, pixmim_*, simmim_*, a2mim_*, maskfeat_*, data2vec2_*, ijepa_*, fcmae_*)
    with the config's overrides."""
    import fastmim

    kwargs = dict(img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss, fused_ops=cfg.fused_ops)
    if cfg.mask_ratio is not None:
        kwargs["mask_ratio"] = cfg.mask_ratio
    for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if getattr(cfg, k) is not None:
            if cfg.model.startswith(("simmim_", "a2mim_", "maskfeat_", "data2vec2_", "ijepa_")):
                family = cfg.model.split("_")[0]
                head = {"maskfeat": "a linear layer", "data2vec2": "a convolutional decoder",
                        "ijepa": "the predictor"}.get(family, "a 1x1 convolution")  # fmt: skip
                names = {"simmim": "SimMIM", "a2mim": "A2MIM", "maskfeat": "MaskFeat", "data2vec2": "data2vec 2.0",
                         "ijepa": "I-JEPA"}  # fmt: skip
                name = names[family]
                raise UsageError(f"--{k.replace('_', '-')} does not apply to {name}: its head is {head}")
            kwargs[k] = getattr(cfg, k)
    if cfg.model.startswith(EVERY_TOKEN_RECIPES):
        kwargs.update(rel_pos_bias=cfg.rel_pos_bias, abs_pos_embed=cfg.abs_pos, init=cfg.vit_init)
    else:
        why = "whose encoders see every token (a relative position bias needs them all)"
        beit = "whose official encoders are initialised otherwise than MAE's"
        other = "whose official encoders have another position embedding than MAE's"
        for flag, value, default, reason in (("--rel-pos-bias", cfg.rel_pos_bias, None, why),
                                             ("--abs-pos", cfg.abs_pos, "sincos", other),
                                             ("--vit-init", cfg.vit_init, "mae", beit)):  # fmt: skip
            if value != default:
                raise UsageError(f"{flag} {value} applies to SimMIM, A2MIM and MaskFeat, {reason}; "
                                 f"{cfg.model.split('_')[0]}'s encoder does not take it")  # fmt: skip
    if cfg.model.startswith(("data2vec2_", "ijepa_")):
        for flag, value in (("--drop-path", cfg.drop_path), ("--layer-scale", cfg.layer_scale)):
            if value:
                raise UsageError(f"{flag} does not apply to the teacher recipes (data2vec 2.0, I-JEPA): their "
                                 "encoders train without it, as in the official recipes")  # fmt: skip
    elif cfg.model.startswith(("mae_", "pixmim_", "simmim_", "a2mim_", "maskfeat_", "fcmae_")):
        kwargs["drop_path_rate"] = cfg.drop_path  # stochastic depth (SimMIM and A2MIM: 0.1)
        if not cfg.model.startswith("fcmae_"):
            kwargs["init_values"] = cfg.layer_scale  # layer scale (SimMIM and A2MIM: 0.1)
        elif cfg.layer_scale is not None:
            raise UsageError("--layer-scale applies to the ViT recipes; FCMAE's ConvNeXt V2 blocks have none (GRN "
                             "took its place)")  # fmt: skip
    if cfg.fused_norm:
        kwargs["fused_norm"] = True  # ViT: residual adds fused with the next LayerNorm; FCMAE: bf16-out LayerNorms
    if cfg.fused_gelu:
        if cfg.model.startswith("fcmae_"):
            raise UsageError("--fused-gelu applies to the ViT recipes; FCMAE's ConvNeXt V2 MLPs end in GRN, not fc2")
        kwargs["fused_gelu"] = True
    if cfg.sparse_backend != "auto" and not cfg.model.startswith("fcmae_"):
        raise UsageError(f"--sparse-backend {cfg.sparse_backend} applies to FCMAE's sparse ConvNeXt V2 (fcmae_*), not "
                         f"{cfg.model}")  # fmt: skip
    if cfg.num_masks is not None and not cfg.model.startswith("data2vec2_"):
        raise UsageError("--num-masks applies to data2vec 2.0 (data2vec2_*): the other recipes draw one mask per image")
    if cfg.model.startswith("ijepa_"):
        _no_norm_pix(cfg, kwargs, "I-JEPA's target is the teacher's features")
        if cfg.mask_type is not None or cfg.mask_ratio is not None:
            raise UsageError("I-JEPA draws its own multi-block masks (their block scales set the amounts); "
                             "--mask-type and --mask-ratio do not apply")  # fmt: skip
        kwargs.pop("mask_ratio", None)
        kwargs["attn_impl"] = cfg.attn_impl
    elif cfg.model.startswith("data2vec2_"):
        _no_norm_pix(cfg, kwargs, "data2vec 2.0's target is the teacher's features")
        if cfg.mask_type is not None:
            raise UsageError(f"--mask-type {cfg.mask_type} does not apply to data2vec 2.0: it draws its own inverse "
                             "block masks (--mask-ratio and --num-masks set them)")  # fmt: skip
        if cfg.num_masks is not None:
            kwargs["num_masks"] = cfg.num_masks
        kwargs["attn_impl"] = cfg.attn_impl
    elif cfg.model.startswith("maskfeat_"):
        _no_norm_pix(cfg, kwargs, "MaskFeat's target is HOG features")
        kwargs.update(mask_type=cfg.mask_type, attn_impl=cfg.attn_impl)
    elif cfg.model.startswith(("simmim_", "a2mim_")):
        _no_norm_pix(cfg, kwargs, "SimMIM and A2MIM predict the normalised image itself")
        kwargs.update(mask_type=cfg.mask_type, attn_impl=cfg.attn_impl)
    elif cfg.model.startswith(("mae_", "pixmim_")):
        kwargs.update(mask_type=cfg.mask_type or "random", attn_impl=cfg.attn_impl)
    elif cfg.model.startswith("fcmae_"):
        if cfg.decoder_num_heads is not None:
            raise UsageError("--decoder-num-heads does not apply to FCMAE: its decoder is convolutional")
        if cfg.mask_type not in (None, "random"):
            raise UsageError(f"--mask-type {cfg.mask_type} does not apply to FCMAE: it masks random 32-px cells "
                             "(--mask-ratio sets how many)")  # fmt: skip
        if cfg.attn_impl != "auto":
            raise UsageError(f"--attn-impl {cfg.attn_impl} does not apply to FCMAE: ConvNeXt V2 has no attention")
        kwargs["sparse_backend"] = cfg.sparse_backend
    else:
        names = fastmim.list_models()
        from fastmim.models.registry import RECIPE_PREFIXES

        recipes = [f"{p}{cfg.model}" for p in RECIPE_PREFIXES if f"{p}{cfg.model}" in names]
        hint = f"; did you mean {' or '.join(recipes)}?" if recipes else ""
        raise UsageError(
            f"model {cfg.model!r} is not a pretraining recipe (MAE models are mae_*, PixMIM pixmim_*, SimMIM simmim_*, "
            f"A2MIM a2mim_*, MaskFeat maskfeat_*, data2vec 2.0 data2vec2_*, I-JEPA ijepa_*, FCMAE fcmae_*){hint}"
        )
    if (cfg.model_args or {}).get("target") == "hog":
        _no_norm_pix(cfg, kwargs, "the HOG target is not normalised per patch")
    for k, v in (cfg.model_args or {}).items():
        if k in kwargs or k in ("img_size", "norm_pix_loss", "mask_type", "mask_ratio", "num_masks"):
            flag = {"drop_path_rate": "--drop-path", "init_values": "--layer-scale",
                    "abs_pos_embed": "--abs-pos", "init": "--vit-init"}.get(k, f"--{k.replace('_', '-')}")  # fmt: skip
            raise UsageError(f"--model-args {k}: set it with {flag} (the run's own flag)")
        kwargs[k] = v
    try:
        model = fastmim.create_model(cfg.model, **kwargs)
    except (TypeError, ValueError) as e:  # a --model-args value the recipe cannot take: say where it came from
        if not any(str(k) in str(e) or repr(v) in str(e) for k, v in (cfg.model_args or {}).items()):
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in cfg.model_args.items())
        where = (f"the model_args of the run being resumed with those given now added: {given}; --model-args none "
                 "clears the run's" if cfg.resume else f"model_args {given}")  # fmt: skip
        raise UsageError(f"{cfg.model}: {e} ({where})") from e
    model = model.to(device)
    if cfg.grad_ckpt:
        from fastmim.models.vit import set_grad_ckpt

        set_grad_ckpt(model)
    return model


def _no_norm_pix(cfg: PretrainConfig, kwargs: dict, why: str) -> None:
    """A recipe whose target is not MAE's pixel patches: norm-pix does not apply (--no-norm-pix-loss is refused)."""
    kwargs.pop("norm_pix_loss", None)
    if not cfg.norm_pix_loss:
        raise UsageError(f"--no-norm-pix-loss does not apply to {cfg.model}: {why}")


def check_lr_schedule(cfg: PretrainConfig, lr: float, eff_batch: int, info: DistInfo, warm: bool = False) -> None:
    """The schedule warms up from --warmup-lr to the peak ``lr`` and decays to --min-lr: a --min-lr above the peak
    would make the decay climb (refused); a --warmup-lr above it makes the warm-up descend (said: a config's absolute
    warm-up lr with a small batch's scaled peak does that; not once the run is past its warm-up, ``warm``)."""
    origin = "--lr" if cfg.lr is not None else f"--blr {cfg.blr:g} x batch {eff_batch} / 256"
    if cfg.min_lr > lr and cfg.lr_schedule == "cosine":
        raise UsageError(f"--min-lr {cfg.min_lr:g} is above the peak learning rate {lr:.3g} ({origin}): the cosine "
                         "decay would raise the learning rate; lower --min-lr or raise the peak")  # fmt: skip
    if cfg.warmup_epochs > cfg.epochs and info.is_main:
        print(f"note: --warmup-epochs {cfg.warmup_epochs:g} is longer than the run's --epochs {cfg.epochs}: the "
              f"learning rate never reaches its peak {lr:.3g}", flush=True)  # fmt: skip
    if cfg.warmup_epochs > 0 and cfg.warmup_lr > lr and info.is_main and not warm:
        print(f"note: --warmup-lr {cfg.warmup_lr:g} is above the peak learning rate {lr:.3g} ({origin}): the warm-up "
              "lowers the learning rate", flush=True)  # fmt: skip


def check_fsdp(cfg: PretrainConfig) -> None:
    """--fsdp's combinations that are not supported, refused before anything is written."""
    if not cfg.fsdp:
        return
    if cfg.amp == "fp16":
        raise UsageError("--fsdp trains with --amp bf16 or none: fp16's gradient scaler is not sharded (use bf16)")
    if cfg.cuda_graph:
        raise UsageError("--fsdp with --cuda-graph is not supported: FSDP's collectives run between the graph's "
                         "kernels (drop one of them)")  # fmt: skip
    if cfg.compile:
        raise UsageError("--fsdp with --compile is not supported yet (drop --compile)")


def check_cuda_graph(cfg: PretrainConfig, device: torch.device) -> None:
    """--cuda-graph captures CUDA work; elsewhere there is nothing to capture. FASTMIM_CUDA_GRAPH_ON_CPU=1 (for tests)
    runs its code path uncaptured on CPU instead of refusing."""
    if cfg.cuda_graph and cfg.weight_decay_end is not None:
        raise UsageError("--weight-decay-end with --cuda-graph is not supported: the captured AdamW step keeps the "
                         "weight decay it was captured with (drop one of them)")  # fmt: skip
    if cfg.cuda_graph and device.type != "cuda" and os.environ.get("FASTMIM_CUDA_GRAPH_ON_CPU") != "1":
        raise UsageError(f"--cuda-graph needs a CUDA device; this run is on {device} (drop --cuda-graph)")


def check_compile(cfg: PretrainConfig, device: torch.device) -> tuple[str, str] | None:
    """--compile's mode and why it was chosen (None without --compile); a mode that cannot run is refused."""
    if not cfg.compile:  # the mode is ignored (a resumed run's saved mode, with --no-compile now)
        return None
    try:
        return resolve_compile_mode(cfg.compile_mode, device, cuda_graph=cfg.cuda_graph)
    except ValueError as e:
        raise UsageError(str(e)) from e


def run(argv: list[str] | None = None) -> Path:
    """Runs pretraining; returns the output directory."""
    from fastmim.train.progress import check_progress_setting

    try:
        check_progress_setting()  # (before any work: the first progress bar comes after the model's build)
    except ValueError as e:
        raise UsageError(str(e)) from None
    origins = {}
    cfg, state = resolve_config(argv, origins)
    info, device = init_distributed(cfg.device)
    try:
        return _run(cfg, state, info, device)
    except UsageError as e:  # a refused flag that the user set in a config file: say which file
        raise UsageError(with_origins(str(e), origins, cfg.to_dict())) from None
    except ValueError as e:  # (one naming a --flag: "fewer than --accum-iter 8", set by a recipe's file)
        said = with_origins(str(e), origins, cfg.to_dict())
        if type(e) is not ValueError or said == str(e):
            raise
        raise ValueError(said) from None
    except RuntimeError as e:
        if _out_of_memory(e):  # (a traceback through the autograd engine tells the user nothing to do)
            raise OutOfMemory(out_of_memory_advice(cfg, device, e)) from None
        raise
    finally:
        cleanup(info)


def with_origins(message: str, origins: dict, values: dict | None = None) -> str:
    """``message`` with, for each --flag it names whose value came from a config file or the run's saved config
    (not the command line), where that value was set; ``model_args`` named as such too. With ``values`` (the run's
    settings), a flag followed by another number than the run's ("--max-steps 75 stops at its end") is advice, not
    the value at fault: not followed up."""
    said = []
    named = re.findall(r"--([a-z][a-z0-9-]*)(?:[ =]([-+.\w]+))?", message)
    if re.search(r"\(model_args ", message):  # (build_model's: from a file, named as set there; else the flag)
        if origins.get("model_args", "the command line") == "the command line":
            message = message.replace("(model_args ", "(with --model-args ")
        named.append(("model-args", ""))
    for key in dict.fromkeys(flag.replace("-", "_") for flag, _ in named):
        if origins.get(key, "the command line") == "the command line":
            continue
        current = (values or {}).get(key)
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            said_values = [v for f, v in named if f.replace("-", "_") == key and v]
            numbers = [float(v) for v in said_values if re.fullmatch(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?", v)]
            # (messages print values to 6 digits, {:g}: a number that close is the value itself)
            if numbers and not any(math.isclose(n, current, rel_tol=1e-5) for n in numbers):
                continue
        said.append(f"{key} set in {origins[key]}")
    return f"{message} ({'; '.join(said)})" if said else message


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _run(cfg: PretrainConfig, state: dict | None, info: DistInfo, device: torch.device) -> Path:
    from fastmim import _ext
    from fastmim.train.engine import Trainer, resolve_amp
    from fastmim.train.optim import build_adamw, decay_summary

    changes = (state or {}).pop("resume_changes", None)  # (what resolve_config found the resume changed)
    check_fsdp(cfg)  # before anything is written
    check_cuda_graph(cfg, device)
    compile_mode = check_compile(cfg, device)
    eff_batch = cfg.batch_size * cfg.accum_iter * info.world_size
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    warm = state is not None and state.get("epoch", 0) >= cfg.warmup_epochs  # (a resume past the warm-up)
    check_lr_schedule(cfg, lr, eff_batch, info, warm)
    base = Path(cfg.output_dir) if cfg.output_dir else Path("output")  # (the default run folder goes in output/)
    made = [p for p in (base, *base.parents) if not p.exists()]  # the folders the run will make
    out, lock = prepare_output_dir(cfg, info)
    loader = None
    try:  # (DALI's pipeline holds its files mapped: released at the end, not when the collector gets to it)
        try:  # what can still refuse the run (data, model, loader): the folders made for it are not left behind empty
            _seed_everything(cfg.seed)  # every rank builds the same initial weights (FSDP shards them where they are)
            data_cfg, dataset, problem = with_builtin_data(cfg), None, None
            try:  # (under torchrun a rank's own problem is told to every rank below, so none waits for it)
                kind, root, why = choose_loader(data_cfg, device, state, info)
                _check_loader_on_resume(cfg, state, kind, why)
                dataset = build_dataset(data_cfg, root)
            except Exception as e:
                if not info.enabled:
                    raise
                problem = e
            check_same_data(dataset, info, problem)
            monitor = build_monitor(cfg, info, device)
            model = build_model(cfg, device)
            if state is None and cfg.init_weights:  # (a resume's weights are its checkpoint's)
                said = init_model_weights(model, read_init_weights(cfg.init_weights), repr(cfg.init_weights))
                if info.is_main:
                    print(f"note: {said}", flush=True)
            elif cfg.init_weights and cfg.init_weights != (state.get("config") or {}).get("init_weights"):
                if info.is_main:
                    print(f"note: --init-weights changes nothing in a resumed run: its weights come from its "
                          f"checkpoint ({str(cfg.init_weights)!r} is not read)", flush=True)  # fmt: skip
            if changes:
                changes = _unchanged_defaults(changes, cfg, model, state)
            if info.rank:  # then each rank its own random stream (drop path, decoder noise)
                _seed_everything((cfg.seed + info.rank) % 2**32)
            masks = model.mask_strategy(seed=cfg.seed)
            loader, sampler, loader_desc = build_loader(cfg, kind, dataset, masks, info, device)
            amp_dtype = resolve_amp(cfg.amp, device)
            if info.is_main:
                for text in _unused_settings(cfg, kind):
                    print(f"note: {text}", flush=True)
            if amp_dtype is not None and device.type == "cpu" and info.is_main:
                _note_cpu_autocast(amp_dtype)
            if cfg.fsdp:  # sharded before the optimizer is built: it steps the shards
                from fastmim.train.fsdp import init_single_process_group, shard_model

                if not info.enabled:
                    init_single_process_group(device)
                shard_model(model, amp_dtype)
            optimizer = build_adamw(
                model, lr, cfg.weight_decay, betas=(0.9, cfg.beta2), graph=cfg.cuda_graph, exempt=cfg.decay_exempt
            )
            step_model = model
            if info.enabled and not cfg.fsdp:
                step_model = wrap_ddp(model, device)
            if compile_mode is not None:
                step_model = compile_model(step_model, compile_mode[0])
            from fastmim.provenance import run_provenance

            provenance = run_provenance(loader=kind, loader_why=why, data=str(root or dataset.root), device=str(device),
                                        amp=str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
                                        world_size=info.world_size)  # fmt: skip
            if state is not None:  # the steps before this resume: made with what (kept when the versions changed)
                provenance["earlier"] = earlier_provenance(state, provenance)
            trainer = Trainer(cfg, info, device, step_model, model, optimizer, loader, sampler, dataset, out, lr,
                              amp_dtype=amp_dtype, monitor=monitor, provenance=provenance)  # fmt: skip
            resumed = state is not None
            if resumed:
                trainer.load_state_dict(state)
                del state
            if info.is_main and trainer.pos.step < trainer.total_steps:
                if not resumed:  # (a full disk here leaves no empty folder behind)
                    save_yaml(cfg, out / "config.yaml", trainer.provenance)
                # a resume's config.yaml is rewritten with its first checkpoint, as at every save: until then it
                # says what the checkpoint was made with (a resume that diverged or died before saving left the
                # settings that never trained in it, for a --config of the run to bring back)
                if changes:  # config.yaml holds the settings from here on; which steps ran with which is kept here
                    said = "; ".join(f"{k} {_setting_text(k, a, cfg.model)} -> {_setting_text(k, b, cfg.model)}"
                                     f"{_implied(k, a, b, cfg, trainer)}"
                                     for k, (a, b) in changes.items())  # fmt: skip
                    print(f"note: resuming with changed settings: {said} (recorded in {CHANGES_FILE} with this "
                          "resume's first checkpoint)", flush=True)  # fmt: skip
                    row = json.dumps({"step": trainer.pos.step, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "changed": changes}, default=str)  # fmt: skip

                    def record(row=row) -> None:
                        with open(out / CHANGES_FILE, "a") as f:
                            f.write(row + "\n")

                    trainer.after_next_save.append(record)
            elif info.is_main and changes:  # a finished run: nothing trains, so nothing of them applies
                said = ", ".join(changes)
                more = ("raise --epochs" if trainer.total_steps == trainer.schedule_steps else
                        f"raise --max-steps (its {cfg.max_steps} ends the run; None: the whole schedule)")  # fmt: skip
                print(f"note: the run has no steps left, so the changed settings ({said}) change nothing: its outputs "
                      f"(encoder.safetensors included) stay as they are; {more} to train on with them",
                      flush=True)  # fmt: skip
        except BaseException:
            if info.is_main:
                lock.release()  # (its file too: a folder made for the run goes if it is empty)
                _remove_empty(out, made[-1] if made else (out if cfg.output_dir is None else None))
            raise
        if info.is_main:
            pos = trainer.pos  # (epochs counted from 1 in what is printed, as the progress bar does)
            where = f"epoch {pos.epoch + 1}, after {pos.batch} of its batches" if pos.batch or not pos.epoch else \
                f"the end of epoch {pos.epoch}"  # fmt: skip
            n_params = sum(p.numel() for p in model.parameters()) / 1e6
            source = dataset.root if root == data_cfg.data_path else data_cfg.data_path  # (the folder, not its scan)
            shards = f" in {_n(len(dataset.shards), 'tar shard')}" if getattr(dataset, "shards", None) else ""
            amp_name = str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "fp32"
            per_node = info.local_world_size
            nodes = f" ({info.world_size // per_node} nodes x {per_node})" if 0 < per_node < info.world_size else ""
            print(
                f"fastmim: {cfg.model} ({n_params:.1f}M params) on {device} x{info.world_size}{nodes}"
                f"{', FSDP (sharded over ' + str(info.world_size) + ')' if cfg.fsdp else ''}, "
                f"amp={amp_name}, native ext={'yes' if _ext.available() else 'no'}"
                + (f", torch.compile mode {compile_mode[0]} ({compile_mode[1]})" if compile_mode else "")
                + "\n"
                f"  data: {len(dataset)} images{shards} from {source}, loader {loader_desc}: {why}\n"
                f"  batch {eff_batch} (= {cfg.batch_size} x {cfg.accum_iter} accum x {info.world_size} procs), "
                f"lr {lr:.3g}, {trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps\n"
                + (
                    f"  weight decay {cfg.weight_decay} (--decay-exempt {cfg.decay_exempt}): "
                    f"{decay_summary(trainer.raw_model, trainer.optimizer)}\n"
                    if cfg.weight_decay or cfg.weight_decay_end
                    else "  weight decay 0: none\n"
                )  # fmt: skip
                + f"  output: {out}"
                + (
                    f"\n  resuming at step {pos.step} ({where})" if cfg.resume else ""
                )  # fmt: skip  # (epochs counted from 1, as the progress bar does)
                + (
                    f"\n  note: --accum-iter {cfg.accum_iter} does not divide the {trainer.loader_batches} batches "
                    f"of an epoch: {trainer.loader_batches - trainer.batches_per_epoch} batch(es) at each epoch's "
                    "end go unused"
                    if trainer.loader_batches != trainer.batches_per_epoch
                    else ""
                ),  # fmt: skip
                flush=True,
            )
        try:
            pos = trainer.fit()
        except BadImageError as e:  # a folder with a scan, read as it is: the scan lists the good files
            if kind != "dali" and root is not None and os.path.isdir(root):
                from fastmim.data.scan import find_scan, scan_header

                scan = find_scan(root)
                bad = scan_header(scan)[2] if scan is not None else 0
                if bad:
                    e.scan = (scan, bad)
            raise
    finally:
        if hasattr(loader, "close"):
            loader.close()
        if lock is not None:
            lock.release()
    if info.is_main:
        print(f"done: step {pos.step}, outputs in {out}", flush=True)
    return out


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def earlier_provenance(state: dict, now: dict) -> list[dict]:
    """The saved run's record of its earlier segments, and one for the segment that ends at the checkpoint when its
    fastmim, commit or library versions differ from ``now`` (an earlier fastmim's checkpoint has no record)."""
    was = state.get("provenance")
    if was is None:
        return [{"until_step": state.get("step"), "fastmim": "an earlier fastmim (no record)"}]
    earlier = list(was.get("earlier") or [])
    keys = ("fastmim", "commit", "torch", "torchvision", "triton", "pillow", "dali", "native_ext")
    if any(was.get(k) != now.get(k) for k in keys):
        earlier.append({"until_step": state.get("step"), **{k: was.get(k) for k in keys}})
    return earlier


def bad_file_message(e: BadImageError | DaliDecodeError) -> str:
    """The one line for a file a loader cannot decode: the file, what to do, and what the run kept (the trainer
    sets ``resumable``, ``saved_step`` and ``steps_lost`` on the error it raises)."""
    resumable = getattr(e, "resumable", None)
    if resumable is None:  # raised outside the training loop: the error's own text
        return f"{e.summary()}. Replace or remove the file and run again" if isinstance(e, BadImageError) else str(e)
    lost, saved = e.steps_lost, e.saved_step
    steps = _n(lost, "step")
    if resumable:
        kept = f"the run is checkpointed at step {saved}" + (f" ({steps} after it lost)" if lost else "")
    else:
        kept = (
            f"no checkpoint had been written ({steps} done, lost)" if lost else "no step had completed, nothing is lost"
        )
    then = "run again with --resume" if resumable else "run again"
    if isinstance(e, DaliDecodeError):
        head, fix = e.problem, e.remedy(resumable, resume=then)
    elif re.search(r"\.tar:\d+:", e.summary()):  # a member of a tar shard (shard:offset:member)
        head, fix = e.summary(), (f"Rewrite the shard with a good image under the same member name (a shard without it "
                                  f"is another data set, which a resume inside the epoch refuses), or pass "
                                  f"--skip-bad-files, and {then}")  # fmt: skip
    else:
        head, fix = e.summary(), f"Replace the file at the same path and {then}"
        scan = getattr(e, "scan", None)
        if scan is not None:  # (a new data set for the run: a resume inside the epoch refuses it)
            fix += (f" (or start a run with --data-path {scan[0]}, this folder's up-to-date scan, which leaves out the "
                    f"{_n(scan[1], 'bad image')} it found, or with --skip-bad-files)")  # fmt: skip
    return f"{head}. {fix}: {kept}"


def _say(text: str) -> None:
    """``text`` on stderr, each of its lines prefixed with "rank N: " in a process other than rank 0."""
    prefix = _rank_prefix()
    print("\n".join(prefix + line for line in text.splitlines()) if prefix else text, file=sys.stderr)


def _rank_prefix() -> str:
    """ "rank N: " in front of what a process other than rank 0 prints (read from the launcher's environment, which
    holds whether or not the process group still exists); nothing for rank 0 or a single process."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"rank {rank}: "


def main(argv: list[str] | None = None) -> int:
    guard_output()  # (a terminal that goes while SIGHUP is ignored, disown or nohup: the run prints on, to /dev/null)
    try:
        with stop_outside_training():  # a stop signal before or after training: exit REQUEUE_EXIT too
            run(argv)
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError) as e:
        # (a usage error: once per node under torchrun; a non-finite loss or a collapsed loss scale, which every rank
        # finds alike from the all-reduced loss and the shared gradients: once, by rank 0)
        if isinstance(e, UsageError):
            shown = says_usage_errors()
        else:
            shown = _rank_prefix() == "" or not getattr(e, "same_on_every_rank", False)
        if shown:
            _say(f"error: {e}")
        return 2
    except OSError as e:  # a full disk, a failed save, a read-only or unwritable folder: one line; any other keeps
        # its traceback
        if isinstance(e, WriteError) or e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC,
                                                    errno.EDQUOT):  # fmt: skip
            print(f"error: {e if isinstance(e, WriteError) else f'{e.strerror}: {e.filename}'}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint (if any) is intact", file=sys.stderr)
        return 130
    except OutOfMemory as e:
        _say(f"error: {e}")  # (each rank its own, every line prefixed: the ranks' blocks can be told apart)
        return 1
    except (BadImageError, DaliDecodeError) as e:  # one line naming the file, not a worker's traceback
        print(f"error: {bad_file_message(e)}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM / SIGUSR1: saved at the step boundary; the exit status asks for a requeue
        print(f"{_rank_prefix()}stopped on {e}", file=sys.stderr)  # (each rank says it stopped, once)
        return stopped_status(e.exit_status, argv)  # (130 for Ctrl-C: not a requeue)
    except StopRequested as e:  # outside the training loop: no step to save
        print(f"{_rank_prefix()}stopped on {e} outside training: nothing new to save, the last checkpoint (if any) is "
              "intact; run the command again with --resume if-exists to continue (it starts the run when it has no "
              "checkpoint yet)", file=sys.stderr)  # fmt: skip
        return stopped_status(REQUEUE_EXIT, argv)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
