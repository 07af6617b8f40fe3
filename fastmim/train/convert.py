"""``python -m fastmim.train.convert RUN/checkpoint.dcp OUT.pt``: a sharded (--fsdp) checkpoint as the ordinary
single-file checkpoint (what a run without --fsdp saves and resumes from) and, with ``--encoder``, the encoder's
weights as ``encoder.safetensors`` (timm names). Runs on one process, no GPU needed; never overwrites a file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert(src: str | Path, dst: str | Path, encoder: str | Path | None = None) -> dict:
    """Writes ``dst`` (and ``encoder``) from the sharded checkpoint ``src``; returns the written state."""
    import torch  # (here: ``--help`` and a usage error print without torch's import)

    from fastmim.config import PretrainConfig, apply_overrides, migrate_saved_config
    from fastmim.pretrain import build_model
    from fastmim.train import checkpoint as ckpt
    from fastmim.train.fsdp import load_dcp_into, load_meta
    from fastmim.train.optim import build_adamw, param_names

    dst = Path(dst)
    for out in (dst, encoder):
        if out is not None and Path(out).exists():
            raise FileExistsError(f"{str(out)!r} exists; choose another path (nothing was overwritten)")
    if Path(src).is_file():
        raise ValueError(f"{str(src)!r} is a single-file checkpoint already (it resumes as it is); convert takes a "
                         "sharded one, the checkpoint.dcp folder of an --fsdp run")  # fmt: skip
    meta = load_meta(Path(src))
    saved = {k: v for k, v in meta["config"].items() if k not in ("resume", "output_dir")}
    saved = migrate_saved_config(saved, meta.get("config_format"))
    cfg = apply_overrides(PretrainConfig(), saved, f"the config saved in {src}")
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_adamw(model, 0.0, cfg.weight_decay, betas=(0.9, cfg.beta2), exempt=cfg.decay_exempt)
    load_dcp_into(Path(meta["dcp"]), model, optimizer, meta.get("shard_crc"))
    optim = ckpt.optimizer_tensors(optimizer)
    sums = torch.cat([ckpt.weights_sums(model.parameters()), ckpt.weights_sums(optim)]).tolist()
    ckpt.weights_check(tuple(sums), meta)  # a damaged shard: refused
    run = {k: v for k, v in meta.items() if k not in ("dcp", "shard_crc")}  # the sums too: a resume checks them
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "optimizer_params": param_names(model, optimizer), **run}  # fmt: skip
    ckpt.save_checkpoint(dst, state)
    if encoder is not None:
        info = ckpt.encoder_metadata(model, cfg.model, meta["step"], cfg.img_size)
        ckpt.save_encoder(encoder, model.encoder_state_dict(), info)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmim.train.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a sharded checkpoint directory (RUN/checkpoint.dcp)")
    parser.add_argument("dst", help="the single-file checkpoint to write (.pt)")
    parser.add_argument("--encoder", help="also write the encoder's weights here (.safetensors)")
    args = parser.parse_args(argv)
    from fastmim.pretrain import UsageError

    try:
        state = convert(args.src, args.dst, args.encoder)
    except (FileNotFoundError, FileExistsError, ValueError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    epoch, batch = state["epoch"], state.get("batch", 0)  # (at an epoch's end, a finished run's too: that epoch)
    where = f"epoch {epoch + 1}, after {batch} of its batches" if batch or not epoch else f"the end of epoch {epoch}"
    print(f"wrote {args.dst} (step {state['step']}: {where})" + (f" and {args.encoder}" if args.encoder else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
