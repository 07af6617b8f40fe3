"""``python -m fastmim.eval knn|linprobe|finetune --encoder RUN_DIR [--data-path TRAIN --val-path VAL]``.

Without data paths all three read the built-in labelled data (scikit-learn's digits as class folders);
``--data-path ROOT`` alone reads ROOT/train and ROOT/val.
``--random MODEL`` evaluates a randomly initialised encoder: the baseline a pretrained one must beat (``--random RUN``,
a run's folder: the encoder its config.yaml describes, with its options and initialisation). Each result is
appended as one JSON line to ``--out`` (default: eval.jsonl beside the encoder, or in the run's folder for ``--random
RUN``) and printed as one line.
``finetune`` runs under torchrun too (data-parallel) and works in its own folder beside eval.jsonl (finetune/,
finetune-2/, ...: never over an earlier one): checkpoint.pt every epoch, history.jsonl, finetuned.safetensors and
args.json (the command's settings: ``finetune --resume DIR`` alone continues it with them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from fastmim._args import ArgumentParser, expand_home


def build_parser(mode: str | None = None) -> argparse.ArgumentParser:
    """The command's parser; ``mode``: its --help lists that mode's options alone (``knn --help``)."""
    ap = ArgumentParser(prog="python -m fastmim.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("knn", "linprobe", "finetune"),
                    help="what to run (MODE --help: that mode's options alone)")  # fmt: skip
    src = ap.add_mutually_exclusive_group()  # one of them is required, unless finetune --resume reads it
    src.add_argument("--encoder", help="a run directory, its encoder.safetensors, or a timm checkpoint (with --model)")
    src.add_argument(
        "--random",
        metavar="MODEL",
        help="a randomly initialised encoder (vit_tiny_patch16, ...), or a "
        "run's folder: the encoder its config.yaml describes (layer scale, relative position bias, init)",
    )
    ap.add_argument("--model", help="the encoder's architecture when the file does not say it (a timm checkpoint)")
    ap.add_argument("--data-path", help="labelled training folder root/<class>/<image> with --val-path; alone, a "
                    "ROOT holding train/<class>/ and val/<class>/, or builtin:digits (the default)")  # fmt: skip
    ap.add_argument("--val-path", help="labelled validation folder, classes a subset of the training folder's")
    ap.add_argument("--img-size", type=int, default=None, help="input side (default: the encoder's; ConvNeXt 224)")
    ap.add_argument(
        "--pool",
        choices=("auto", "cls", "avg"),
        default="auto",
        help="ViT feature. knn, linprobe: the class token (auto, when there is one) or the mean of the patch tokens "
        "(avg); finetune: MAE's global pool, a new fc_norm on the patch tokens' mean (auto, avg), or the class "
        "token (cls)",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="knn: images per forward pass (256); linprobe: the "
                    "probe's batch (16384, MAE's: 32 GPUs x 512; all the images where fewer); finetune: per process "
                    "(64)")  # fmt: skip
    ap.add_argument("--accum-iter", type=int, default=None, help="finetune: batches whose gradients are summed per "
                    "optimizer step (1; the recipes' effective batch is 1024, data2vec 2.0's 512: --batch-size 64 "
                    "--accum-iter 16 on one GPU)")  # fmt: skip
    ap.add_argument("--feature-batch", type=int, default=256, help="linprobe: images per forward pass of the frozen "
                    "encoder, 256 (its features are gathered into the probe's batch)")  # fmt: skip
    ap.add_argument("--workers", type=int, default=0, help="loader processes")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    ap.add_argument("--k", type=int, default=20, help="kNN: neighbours (DINO: 20)")
    ap.add_argument("--temperature", type=float, default=0.07, help="kNN: vote temperature (DINO: 0.07)")
    ap.add_argument("--epochs", type=int, default=None, help="linprobe: 90, finetune: the recipe's")
    ap.add_argument("--warmup-epochs", type=float, default=None, help="linprobe: 10, finetune: the recipe's")
    ap.add_argument("--blr", type=float, default=None, help="lr = blr x batch / 256 (linprobe: 0.1, finetune: the "
                    "recipe's)")  # fmt: skip
    ft = ap.add_argument_group(
        "finetune (defaults: the encoder's official recipe, named when it starts: MAE's ViT-B: 100 epochs, blr 5e-4, "
        "layer decay 0.65, drop path 0.1; ViT-L: 50 epochs, blr 1e-3, 0.75, 0.2; ViT-H: as L, drop path 0.3; "
        "ConvNeXt V2's Atto, Tiny and Base (TRAINING.md), e.g. Base: 100 epochs, 20 warm-up, blr 6.25e-4, group "
        "layer decay 0.6)"
    )
    ft.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay")
    ft.add_argument("--layer-decay-type", choices=("single", "group", "blocks"), default=None,
                    help="one layer per block (single; the stem or patch embedding first, the head last); ConvNeXt "
                    "V2's 12 groups (group: its Base and larger recipe); only a ViT's blocks decayed (blocks: "
                    "data2vec 2.0's)")  # fmt: skip
    ft.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    ft.add_argument("--weight-decay", type=float, default=None)
    ft.add_argument("--min-lr", type=float, default=None, help="the cosine's floor (the recipe's: 1e-6; data2vec 2.0's "
                    "ViT-L 1e-7)")  # fmt: skip
    ft.add_argument("--mixup", type=float, default=None, help="mixup alpha (0: off)")
    ft.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (0: off)")
    ft.add_argument("--smoothing", type=float, default=None, help="label smoothing")
    ft.add_argument("--model-ema", type=float, default=None, metavar="DECAY",
                    help="keep an EMA of the weights with this decay and report its accuracy too (ConvNeXt V2's "
                    "recipes: 0.9999; 0: off, MAE's)")  # fmt: skip
    ft.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('none': off)")
    ft.add_argument("--reprob", type=float, default=0.25, help="random-erasing probability")
    ft.add_argument(
        "--finetune-dir",
        help="where the fine-tuning writes checkpoint.pt (every epoch), history.jsonl "
        "and finetuned.safetensors (default: a new finetune/, finetune-2/, ... beside eval.jsonl)",
    )
    ft.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the fine-tuning in DIR with the settings it was started with (its args.json; give --epochs "
        "to train longer); 'if-exists' with --finetune-dir: continue there if it holds a checkpoint, else start "
        "there (a requeued job's one command)",
    )
    ap.add_argument(
        "--no-augment",
        action="store_true",
        help="linprobe: train on the cached centre-crop features, not augmented views (much faster)",
    )
    ap.add_argument("--skip-bad-files", action=argparse.BooleanOptionalAction, default=False,
                    help="an image that cannot be read or decoded is named and left out (features, kNN, "
                    "accuracies: over the readable images; counted in the result) or, in a training set (linprobe's "
                    "augmented views, finetune), replaced by another image (a fixed choice), instead of "
                    "stopping (a resumed fine-tuning keeps its choice: --no-skip-bad-files to change it)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="random init (--random) and the probe's shuffling")
    ap.add_argument("--no-cache", action="store_true", help="extract the features again even when cached")
    ap.add_argument(
        "--out",
        help="append the result (JSON) here (default: eval.jsonl beside the encoder; for "
        "--random RUN, in RUN beside the trained encoder's)",
    )
    if mode is not None:  # the other modes' options: not listed (and refused if given, _check_mode_options)
        for action in ap._actions:
            if mode not in MODE_OPTIONS.get(action.dest, (mode,)):
                action.help = argparse.SUPPRESS
        for group in ap._action_groups:  # (a group left empty is not shown)
            if group._group_actions and all(a.help == argparse.SUPPRESS for a in group._group_actions):
                group.title, group.description = None, None
    return ap


def _help_mode(argv: list[str]) -> str | None:
    """The mode of ``MODE --help`` (its options alone are listed); None otherwise."""
    if not {"-h", "--help"} & set(argv):
        return None
    return next((a for a in argv if a in ("knn", "linprobe", "finetune")), None)


DEFAULTS = {"knn": dict(batch_size=256), "linprobe": dict(batch_size=16384, epochs=90, warmup_epochs=10, blr=0.1),
            "finetune": dict(batch_size=64, accum_iter=1)}  # (the rest: the recipe's, finetune_recipe)  # fmt: skip


# what finetune --resume reads from the folder's args.json when the command does not give it (not the machine's
# --device or --workers, nor what names the folder or only changes outputs)
RESUMED_ARGS = ("encoder", "random", "model", "data_path", "val_path", "img_size", "pool", "batch_size", "accum_iter",
                "epochs", "warmup_epochs", "blr", "layer_decay", "layer_decay_type", "drop_path", "weight_decay",
                "min_lr", "mixup", "cutmix", "smoothing", "model_ema", "aa", "reprob", "seed", "out",
                "skip_bad_files")  # fmt: skip
PATH_ARGS = ("encoder", "data_path", "val_path", "out")
ARGS_FILE = "args.json"


def _given(ap, argv) -> set[str]:
    """The options the command line gave (a parse without defaults)."""
    bare = build_parser()
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


# the options only some modes read: given to another, they are refused rather than silently ignored
MODE_OPTIONS = {"k": ("knn",), "temperature": ("knn",), "no_augment": ("linprobe",), "feature_batch": ("linprobe",),
                **dict.fromkeys(("epochs", "warmup_epochs", "blr"), ("linprobe", "finetune")),
                **dict.fromkeys(("layer_decay", "layer_decay_type", "drop_path", "weight_decay", "min_lr", "mixup",
                                 "cutmix", "smoothing", "model_ema", "aa", "reprob", "finetune_dir", "resume",
                                 "accum_iter"),
                                ("finetune",))}  # fmt: skip


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    build_parser(_help_mode(sys.argv[1:])).parse_args(sys.argv[1:])  # the options without torch's import (3 s)

import torch  # noqa: E402 (after the --help fast path)


def _check_mode_options(ap, args, argv) -> None:
    unused = [k for k in sorted(_given(ap, argv)) if args.mode not in MODE_OPTIONS.get(k, (args.mode,))]
    if unused:
        said = "; ".join(f"--{k.replace('_', '-')} is for {' and '.join(MODE_OPTIONS[k])}" for k in unused)
        ap.error(f"{said}: {args.mode} does not use {'it' if len(unused) == 1 else 'them'}")


def _resumed_args(ap, args, argv) -> None:
    """finetune --resume DIR: the settings the fine-tuning in DIR started with, for every one the command leaves out
    (a changed one is refused by the checkpoint's settings check; --epochs may grow)."""
    path = Path(args.resume) / ARGS_FILE
    if not path.is_file():  # a folder from before args.json: the command gives the settings, as it had to
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        ap.error(f"--resume: cannot read {str(path)!r} ({e})")
    given = _given(ap, argv)
    for pair in ({"encoder", "random"}, {"data_path", "val_path"}):  # one source, one data set: the command's
        if given & pair:
            given |= pair
    for name in RESUMED_ARGS:
        if name in saved and name not in given:
            setattr(args, name, saved[name])


def _run_encoder(run: Path, img_size: int | None) -> tuple[str, dict, int]:
    """(model, ViT options, image size) of the encoder a pretraining run in ``run`` started from (its config.yaml)."""
    from fastmim.config import encoder_options, load_yaml

    cfg = load_yaml(run / "config.yaml")
    return cfg["model"], encoder_options(cfg), img_size or cfg.get("img_size")


def _check(ap, args) -> None:
    if args.encoder is None and args.random is None:
        if args.resume and not (Path(args.resume) / "checkpoint.pt").is_file():  # (a mistyped folder)
            ap.error(f"--resume: no fine-tuning checkpoint at {str(Path(args.resume) / 'checkpoint.pt')!r} to resume")
        ap.error("one of the arguments --encoder --random is required" + (
            f" ({str(Path(args.resume) / ARGS_FILE)!r} is missing, so the command must give the settings)"
            if args.resume else ""))  # fmt: skip
    for name, value in DEFAULTS[args.mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch_size", "feature_batch", "accum_iter", "k", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.mode == "linprobe" and args.batch_size < 2:  # (PyTorch: "Expected more than 1 value per channel")
        ap.error(f"--batch-size must be at least 2 for linprobe, got {args.batch_size}: the probe's BatchNorm "
                 "normalises each feature over the batch")  # fmt: skip
    if args.img_size is not None and args.img_size < 1:
        ap.error(f"--img-size must be a positive number of pixels, got {args.img_size}")
    if args.workers < 0 or (args.warmup_epochs or 0) < 0 or args.temperature <= 0 or (
            args.blr is not None and not args.blr > 0):  # fmt: skip
        ap.error("--workers and --warmup-epochs must be >= 0, --blr and --temperature > 0")
    layer_decay, drop_path = (1 if args.layer_decay is None else args.layer_decay), args.drop_path or 0
    if not 0 < layer_decay <= 1 or not 0 <= drop_path < 1 or not 0 <= args.reprob <= 1:
        ap.error("--layer-decay must be in (0, 1], --drop-path in [0, 1), --reprob in [0, 1]")
    if args.model_ema is not None and not 0 <= args.model_ema < 1:
        ap.error(f"--model-ema must be a decay in [0, 1) (0: no EMA), got {args.model_ema}")
    given = (args.mixup, args.cutmix, args.smoothing, args.weight_decay, args.min_lr)
    if min(v for v in (*given, 0) if v is not None) < 0:
        ap.error("--mixup, --cutmix, --smoothing, --weight-decay and --min-lr must be >= 0")
    if args.resume and args.finetune_dir and Path(args.resume) != Path(args.finetune_dir):
        ap.error("--resume DIR continues in DIR: leave out --finetune-dir")
    if args.val_path is not None and args.data_path is None:
        ap.error("--val-path needs --data-path (the training folder its classes come from)")
    if args.mode == "linprobe":
        _note_long_warmup(args)


def _note_long_warmup(args) -> None:
    if args.warmup_epochs >= args.epochs:
        print(f"note: --warmup-epochs {args.warmup_epochs:g} is not shorter than --epochs {args.epochs}: the learning "
              f"rate never reaches its peak (give --warmup-epochs for a short {args.mode})",
              file=sys.stderr)  # fmt: skip


def _apply_recipe(args, info: dict) -> None:
    """finetune: the settings the command leaves out from the encoder's official recipe, which it names."""
    from fastmim.eval.finetune import finetune_recipe

    if args.layer_decay_type == "group" and info["encoder"].startswith("vit"):
        raise ValueError("--layer-decay-type group is ConvNeXt V2's grouping of its blocks; a ViT's layers are its "
                         "blocks: leave it out")  # fmt: skip
    if args.layer_decay_type == "blocks" and not info["encoder"].startswith("vit"):
        raise ValueError("--layer-decay-type blocks is for a ViT (data2vec 2.0's: only its blocks decayed); a "
                         "ConvNeXt's are single or group")  # fmt: skip
    where, recipe = finetune_recipe(info["encoder"], info.get("model"))
    taken = {k: v for k, v in recipe.items() if getattr(args, k) is None}
    for k, v in taken.items():
        setattr(args, k, v)
    if taken and args.dist_info.is_main:
        said = ", ".join(f"{k.replace('_', ' ')} {v:g}" if not isinstance(v, str) else f"{k.replace('_', ' ')} {v}"
                         for k, v in taken.items())  # fmt: skip
        print(f"finetune: {info['encoder']} takes the recipe of {where}: {said}", flush=True)
    args.recipe = where
    if args.dist_info.is_main:
        _note_long_warmup(args)
        _note_effective_batch(args, info)


def _note_effective_batch(args, info: dict) -> None:
    """A note where the fine-tuning's effective batch is not its recipe's (the blr scales to it, but the number of
    steps, the warm-up's and the EMA's horizon in images do not), with the --accum-iter that gives it."""
    from fastmim.eval.finetune import recipe_batch

    want, world = recipe_batch(info["encoder"], info.get("model")), args.dist_info.world_size
    have = args.batch_size * args.accum_iter * world
    if have == want:
        return
    fix = ""
    if want % (args.batch_size * world) == 0:
        fix = f": --accum-iter {want // (args.batch_size * world)} gives it"
    print(f"note: effective batch {have} (--batch-size {args.batch_size} x --accum-iter {args.accum_iter} x {world} "
          f"process{'es' if world > 1 else ''}); the recipe's is {want}{fix}", flush=True)  # fmt: skip


def run(args) -> dict:
    from fastmim.data.samples import builtin_digits, resolve_data_path
    from fastmim.eval.encoder import (
        LabelledFolder,
        cached_features,
        eval_transform,
        eval_view,
        load_encoder,
        recipe_pool,
        train_transform,
    )
    from fastmim.eval.knn import knn_accuracy
    from fastmim.eval.linprobe import train_linear_probe
    from fastmim.eval.monitor import labelled_split
    from fastmim.train.distributed import init_distributed

    dist_info, device = init_distributed(args.device)
    if dist_info.enabled and args.mode != "finetune":
        raise ValueError(f"{args.mode} runs in one process (its features are extracted once); only finetune runs "
                         "under torchrun")  # fmt: skip
    args.dist_info = dist_info
    if args.random:
        torch.manual_seed(args.seed)
    random, vit, size, run = args.random, None, args.img_size, None
    if random is not None and (Path(random) / "config.yaml").is_file():  # a run's folder: its encoder at the start
        run = str(Path(random).resolve())
        args.random = run  # (absolute in a fine-tuning's args.json: a resume may run from elsewhere)
        random, vit, size = _run_encoder(Path(run), args.img_size)
    encoder, info = load_encoder(args.encoder, args.model or random, size, vit=vit)
    pool_arg = args.pool
    if args.mode != "finetune":
        args.pool = recipe_pool(info.get("model"), args.pool)  # (data2vec 2.0's auto: the tokens' mean)
    if run is not None:
        info["random_from"], info["random_options"] = run, vit  # (in the result: which run's options)
    if args.pool == "cls" and not hasattr(encoder, "blocks") and not args.resume:  # (no class token to take; a
        # resumed fine-tuning keeps what it started with)
        raise ValueError(f"--pool cls applies to ViT encoders; {info['encoder']} has no class token, its feature is "
                         "its global average pool and norm: leave --pool out")  # fmt: skip
    if dist_info.is_main:
        _out_path(args, info)  # a bad --out is refused before the evaluation runs, not after
    if args.val_path is not None:  # (builtin:digits and builtin:digits-val name the built-in folders)
        train_root, val_root = resolve_data_path(args.data_path), resolve_data_path(args.val_path)
    elif args.data_path is not None:  # ROOT/{train,val} or builtin:digits, as --eval-data takes them
        train_root, val_root = labelled_split(args.data_path, "--data-path")
    else:
        train_root, val_root = builtin_digits()
    size = info["img_size"]
    # --skip-bad-files: an unreadable image is left out of what is measured, and replaced in what is trained on
    drop, replace = ("drop", "replace") if args.skip_bad_files else ("raise", "raise")
    view = eval_view(size, info["encoder"])  # (MAE's; ConvNeXt V2's for a ConvNeXt)
    train = LabelledFolder(train_root, eval_transform(size, info["encoder"]), bad=drop)
    if len(train.classes) < 2:  # (every accuracy would be 100%, and be appended to eval.jsonl like a real one)
        raise ValueError(f"{train.root} holds {len(train.classes)} class folder: a classification needs at least 2 "
                         "(one folder of images per class)")  # fmt: skip
    val = LabelledFolder(val_root, eval_transform(size, info["encoder"]), classes=train.classes, bad=drop)
    args.bad_images = replace, args.seed  # (the fine-tuning's training set's)
    result = {
        "mode": args.mode, **info, "pool": _resolved_pool(encoder, args), "pool_arg": pool_arg,
        "train": os.path.abspath(train.root), "val": os.path.abspath(val.root), "classes": len(train.classes),
        "train_images": len(train), "val_images": len(val), "device": str(device), "seed": args.seed,
        "batch_size": args.batch_size, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "encoder_sha256": _file_digest(info["path"]), "versions": _versions(),
        "view": {**view, "interpolation": "bicubic"},
    }  # fmt: skip
    t0 = time.perf_counter()
    if args.mode == "finetune":
        try:
            what = _finetune(args, encoder, info, train_root, train, val, device, result)
        finally:
            if getattr(args, "run_lock", None) is not None:
                args.run_lock.release()
    else:
        cache = not args.no_cache
        tf = tl = None
        t_train, hit_train = 0.0, True  # the augmented probe trains on views of the images, not on these features
        per_pass = args.batch_size if args.mode == "knn" else args.feature_batch  # (linprobe's is the probe's)
        if args.mode == "knn" or args.no_augment:
            tf, tl, t_train, hit_train = cached_features(encoder, info, train, device, per_pass, args.workers,
                                                         args.pool, cache)  # fmt: skip
        vf, vl, t_val, hit_val = cached_features(encoder, info, val, device, per_pass, args.workers, args.pool,
                                                 cache)  # fmt: skip
        n_extracted = (0 if hit_train else len(train)) + (0 if hit_val else len(val))
        speed = round(n_extracted / (t_train + t_val), 1) if n_extracted else None
        result.update(feature_dim=vf.shape[1], features_s=round(t_train + t_val, 3),
                      features_cached=hit_train and hit_val, features_img_per_s=speed)  # fmt: skip
        for name, labels, folder in (("training", tl, train), ("validation", vl, val)):
            if labels is not None and not len(labels):
                raise ValueError(f"no image of the {name} folder {str(folder.root)!r} can be read")
        if args.skip_bad_files:  # the images measured: the readable ones
            left_out = {"val": len(val) - len(vl), **({"train": len(train) - len(tl)} if tl is not None else {})}
            result.update(left_out=left_out, val_images=len(vl))
            if tl is not None:
                result["train_images"] = len(tl)
    if args.mode == "knn":
        if args.k > len(tl):
            print(f"note: --k {args.k} is more than the {len(tl)} training images: every one of them votes",
                  flush=True)  # fmt: skip
        acc = knn_accuracy(tf, tl, vf, vl, len(train.classes), args.k, args.temperature)
        result.update(acc, k=args.k, temperature=args.temperature)
        what = f"kNN (k={args.k}, T={args.temperature})"
    elif args.mode == "linprobe":
        probe_set = LabelledFolder(train_root, train_transform(size), classes=train.classes, bad=replace,
                                   seed=args.seed)  # fmt: skip
        feats = dict(train_feats=tf, train_labels=tl) if args.no_augment else {}
        out = train_linear_probe(encoder, probe_set, vf, vl, len(train.classes), device, epochs=args.epochs,
                                 warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, blr=args.blr,
                                 pool=args.pool, workers=args.workers, seed=args.seed,
                                 feature_batch=args.feature_batch, **feats)  # fmt: skip
        result.update(
            top1=out["top1"],
            top5=out["top5"],
            epochs=args.epochs,
            warmup_epochs=args.warmup_epochs,
            blr=args.blr,
            lr=out["lr"],
            min_lr=out["min_lr"],
            augment=not args.no_augment,
            probe_batch=out["batch"],
            steps_per_epoch=out["steps_per_epoch"],
            final_loss=round(out["history"][-1]["loss"], 5),
        )
        cached = ", cached features" if args.no_augment else ""
        what = f"linear probe ({args.epochs} epoch{'' if args.epochs == 1 else 's'}{cached})"
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if not dist_info.is_main:
        return result
    out_path = _out_path(args, info)
    with open(out_path, "a") as f:  # appended: earlier evaluations are kept
        f.write(json.dumps(result) + "\n")
    whose = f"random {info['encoder']}" if info["random_init"] else f"{info['model']}" + (
        " fine-tuned from" if info.get("finetuned") else "") + (
        f" step {info['step']}" if info["step"] is not None else "")  # fmt: skip
    if info.get("random_from"):
        whose += f" (as configured in {info['random_from']})"
    left = sum(result.get("left_out", {}).values())
    print(f"{what} of {whose}: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {result['val_images']} "
          f"images ({len(train.classes)} classes, {result['train_images']} training images"
          f"{f'; {left} unreadable left out' if left else ''}) -> {out_path.resolve()}")  # fmt: skip
    return result


def _file_digest(path: str | None) -> str | None:
    """The encoder file's SHA-256 (hex): which weights were evaluated, whatever the file is called or wherever it
    moved since (None for a random initialisation)."""
    if not path:
        return None
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict:
    from fastmim.provenance import versions

    return versions()


def _resolved_pool(encoder, args) -> str | None:
    """--pool as this mode reads it: fine-tuning's auto is MAE's global pool, kNN's and the probe's resolve_pool's."""
    from fastmim.eval.encoder import resolve_pool

    pool = resolve_pool(encoder, args.pool)
    return "avg" if pool is not None and args.mode == "finetune" and args.pool == "auto" else pool


def _out_path(args, info: dict) -> Path:
    beside = Path(info["path"]).parent if info["path"] else Path(info.get("random_from") or ".")  # (--random RUN)
    path = Path(args.out) if args.out else beside / "eval.jsonl"
    if path.is_dir():  # checked before the evaluation runs, not after
        raise ValueError(f"--out {str(path)!r} is a folder: name the JSON-lines file to append to (e.g. "
                         f"{str(path / 'eval.jsonl')!r})")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _finetune_dir(args, info: dict) -> Path:
    """--resume's or --finetune-dir's folder, else the first free finetune, finetune-2, ... beside eval.jsonl (decided
    on rank 0, agreed by all)."""
    from fastmim.train.distributed import broadcast_object
    from fastmim.train.runlock import LOCK_NAME

    if args.resume:
        return Path(args.resume)
    if args.finetune_dir:
        d = Path(args.finetune_dir)
        if args.dist_info.is_main and (d / "checkpoint.pt").exists():
            raise ValueError(f"--finetune-dir {str(d)!r} holds a fine-tuning already: --resume {d} to continue it, "
                             "or choose another folder")  # fmt: skip
        if args.dist_info.is_main and d.is_dir() and any(f.name not in (ARGS_FILE, LOCK_NAME) for f in d.iterdir()):
            raise ValueError(f"--finetune-dir {str(d)!r} holds files but no checkpoint (a fine-tuning stopped in its "
                             "first epoch?): choose an empty or new folder; nothing there is overwritten")  # fmt: skip
        return d
    folder = _out_path(args, info).parent if args.dist_info.is_main else None
    if folder is not None:
        folder = next(folder / f"finetune{'' if i == 1 else f'-{i}'}" for i in range(1, 10**6)
                      if not (folder / f"finetune{'' if i == 1 else f'-{i}'}").exists())  # fmt: skip
    return Path(broadcast_object(str(folder) if folder else None, args.dist_info))


def _finetune(args, encoder, info, train_root, train, val, device, result: dict) -> str:
    from fastmim.eval.encoder import LabelledFolder
    from fastmim.eval.finetune import CHECKPOINT, finetune, finetune_transform, recipe_extras
    from fastmim.train.checkpoint import clear_stale_temporaries, save_encoder
    from fastmim.train.distributed import broadcast_object
    from fastmim.train.runlock import RunLock

    _apply_recipe(args, info)
    extras = recipe_extras(info.get("model"))  # (AdamW's betas, mixup's share, the head's init: the recipe's)
    result.update(betas=list(extras["betas"]), mixup_prob=extras["mixup_prob"], head_init_std=extras["head_init_std"],
                  clip_grad=extras["clip_grad"])  # fmt: skip
    aa = None if args.aa == "none" else args.aa
    bad, seed = args.bad_images
    train_set = LabelledFolder(train_root, finetune_transform(info["img_size"], aa, args.reprob), classes=train.classes,
                               bad=bad, seed=seed)  # fmt: skip
    n = args.epochs
    run_dir = args.run_dir = _finetune_dir(args, info)
    if args.resume and not (run_dir / "checkpoint.pt").is_file():  # before any folder is made (a mistyped path)
        raise FileNotFoundError(f"no fine-tuning checkpoint at {str(run_dir / 'checkpoint.pt')!r} to resume")
    made = not run_dir.exists()
    ckpt = run_dir / "checkpoint.pt"

    def stamp(path: Path):  # (a checkpoint a resume rewrote is another file: atomic saves rename a new one in)
        st = path.stat() if path.exists() else None
        return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)

    before = stamp(ckpt)  # (a resume refused before training leaves it as it was)
    previous = problem = None  # the args.json a resume replaces; why the folder cannot be used
    if args.dist_info.is_main:  # one process at a time in the folder: its lock, released by run()
        run_dir.mkdir(parents=True, exist_ok=True)
        args.run_lock = RunLock(run_dir, "a fine-tuning")
        problem = args.run_lock.acquire()
        if problem and made and not any(run_dir.iterdir()):
            run_dir.rmdir()
        elif not problem:  # (the folder is this run's: a save killed mid-write left its temporary checkpoint)
            clear_stale_temporaries(run_dir, names=(CHECKPOINT, "finetuned.safetensors", "finetuned_ema.safetensors"))
    problem = broadcast_object(problem, args.dist_info)
    if problem:
        raise ValueError(problem)
    if args.dist_info.is_main:
        print(f"finetune: {'resuming in' if args.resume else 'writing to'} {run_dir}", flush=True)
        # what --resume DIR alone reads back (paths absolute: it may run from elsewhere); a resume that trains
        # longer keeps its --epochs there, so that the next resume (after a requeue) does not ask for fewer
        saved = {k: getattr(args, k) for k in RESUMED_ARGS}
        saved["out"] = str(_out_path(args, info))  # the eval.jsonl this fine-tuning reports to
        saved.update({k: str(Path(saved[k]).resolve()) for k in PATH_ARGS
                      if saved[k] is not None and not str(saved[k]).startswith("builtin")})  # fmt: skip
        if not args.resume or (run_dir / ARGS_FILE).exists():
            previous = (run_dir / ARGS_FILE).read_text() if args.resume else None
            (run_dir / ARGS_FILE).write_text(json.dumps(saved, indent=1) + "\n")

    def log(row):
        with open(run_dir / "history.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        ema = f" (EMA {row['top1_ema']:.2f}%)" if "top1_ema" in row else ""
        print(f"finetune epoch {row['epoch']}/{n}: loss {row['loss']:.4f}, val top-1 {row['top1']:.2f}%{ema} "
              f"({row['seconds']:.1f} s)", flush=True)  # fmt: skip

    try:
        out = finetune(
            encoder, info, train_set, val, len(train.classes), device, epochs=n, warmup_epochs=args.warmup_epochs,
            batch_size=args.batch_size, accum_iter=args.accum_iter, blr=args.blr, min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            layer_decay=args.layer_decay, layer_decay_type=args.layer_decay_type, drop_path=args.drop_path,
            mixup=args.mixup, cutmix=args.cutmix, model_ema=args.model_ema, **extras,
            smoothing=args.smoothing, pool=args.pool, workers=args.workers, seed=args.seed, log=log,
            dist_info=args.dist_info, run_dir=run_dir, resume=bool(args.resume),
            data_settings=dict(auto_augment=aa, reprob=args.reprob, train_data=str(Path(train_root).resolve()),
                               encoder_file=str(Path(info["path"]).resolve()) if info.get("path") else None),
            source={"step": info["step"], "encoder_sha256": result["encoder_sha256"]},
        )  # fmt: skip
    except BaseException:
        if args.dist_info.is_main:
            unchanged = stamp(ckpt) == before
            if args.resume and previous is not None and unchanged:
                (run_dir / ARGS_FILE).write_text(previous)  # a refused resume leaves the folder's settings as they were
            if not args.resume and not ckpt.exists():
                (run_dir / ARGS_FILE).unlink(missing_ok=True)  # a refused or failed start leaves nothing behind
            args.run_lock.release()  # (its file too)
            if made and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # (no empty finetune-N, nor a folder a mistyped --resume made)
        raise
    started = out["source"] or {}  # (a checkpoint from before the digest was kept: the file's, as it is now)
    was, digest = started.get("step", info["step"]), started.get("encoder_sha256", result["encoder_sha256"])
    if was != info["step"] or digest != result["encoder_sha256"]:  # the file was rewritten since the fine-tuning began
        if args.dist_info.is_main:
            print(f"note: {info['path']} has changed (now step {info['step']}) since this fine-tuning started from it "
                  f"(step {was}); it is reported as the encoder it started from", flush=True)  # fmt: skip
        info["step"] = result["step"] = was
        result["encoder_sha256"] = digest
    saved = run_dir / "finetuned.safetensors"
    if args.dist_info.is_main:
        source = str(Path(info["path"]).resolve()) if info["path"] else "None"
        meta = {
            "model": info["encoder"],
            "pool": result["pool"] or "convnext",  # (as resolved: avg for MAE's global pool, cls)
            "classes": json.dumps(train.classes),
            "source": source,
            "img_size": str(info["img_size"]),
            "format": f"timm {type(out['network']).__name__}",  # (VisionTransformer, Beit, ConvNeXt)
        }  # (a ConvNeXt's size is known only from it)
        if info["step"] is not None:
            meta["step"] = str(info["step"])
        pos = getattr(out["network"], "pos_embed", None)
        if isinstance(pos, torch.nn.Parameter) and pos.requires_grad:  # fine-tuned (timm trains it): trainable, loaded
            meta["abs_pos"] = "learned"
        save_encoder(saved, out["network"].state_dict(), meta)
        if "network_ema" in out:  # the EMA's weights beside (ConvNeXt V2 reports their accuracy)
            save_encoder(run_dir / "finetuned_ema.safetensors", out["network_ema"].state_dict(), meta | {"ema": "1"})
    if "network_ema" in out:
        result.update({k: out[k] for k in ("top1_ema", "top5_ema", "best_top1_ema", "best_epoch_ema")},
                      saved_ema=str(run_dir / "finetuned_ema.safetensors"))  # fmt: skip
    if args.skip_bad_files and out["val_images"] is not None:  # the images scored: the readable ones
        result.update(val_images=out["val_images"], left_out={"val": len(val) - out["val_images"]})
    result.update(top1=out["top1"], top5=out["top5"], best_top1=out["best_top1"], best_epoch=out["best_epoch"],
                  epochs=n, warmup_epochs=args.warmup_epochs, blr=args.blr, lr=out["lr"], min_lr=args.min_lr,
                  accum_iter=args.accum_iter,
                  layer_decay=args.layer_decay, layer_decay_type=args.layer_decay_type, recipe=args.recipe,
                  drop_path=args.drop_path, model_ema=args.model_ema,
                  mixup=args.mixup, cutmix=args.cutmix, smoothing=args.smoothing, auto_augment=aa, reprob=args.reprob,
                  weight_decay=args.weight_decay, new_keys=out["fresh_keys"], saved=str(saved),
                  processes=args.dist_info.world_size, resumed=bool(args.resume),
                  history=[{k: round(v, 5) for k, v in r.items()} for r in out["history"]])  # fmt: skip
    ema = f"; EMA: best {out['best_top1_ema']:.2f}% at epoch {out['best_epoch_ema']}" if "network_ema" in out else ""
    epochs = f"{n} epoch{'' if n == 1 else 's'}"
    return f"fine-tuning ({epochs}, best top-1 {out['best_top1']:.2f}% at epoch {out['best_epoch']}{ema})"


def _out_of_memory_advice(args: argparse.Namespace, e: BaseException) -> str:
    """What ran out, and the batch size that would fit (linprobe: its --feature-batch, the encoder's passes; finetune
    with mixup or cutmix, the recipes' default: even, they pair each image with another)."""
    from fastmim._args import out_of_memory_summary

    first = out_of_memory_summary(e)
    if args.mode == "linprobe":  # (the encoder's passes hold the memory; the probe's batch is features only)
        f = args.feature_batch
        if f == 1:
            return f"{first}\nto fit: a smaller --img-size or encoder (--feature-batch is 1)"
        return f"{first}\nto fit: --feature-batch {f // 2} (was {f}: images per forward pass of the encoder)"
    b = args.batch_size
    paired = args.mode == "finetune" and not (args.mixup == 0 and args.cutmix == 0)  # (mixup/cutmix: pairs)
    half = max(2, b // 2 // 2 * 2) if paired else max(1, b // 2)
    if half >= b:
        return f"{first}\nto fit: a smaller --img-size or encoder (--batch-size {b} is the smallest this mode takes)"
    fix = f"--batch-size {half} (was {b})"
    if args.mode == "knn":
        fix += " for the features; the kNN itself compares 1024 images at a time with the whole training set"
    else:
        accum = args.accum_iter or 1
        if b % half == 0:  # the same effective batch, so the same lr and steps, in more passes
            fix += f" with --accum-iter {accum * (b // half)} (was {accum}): the same effective batch"
        else:
            fix += "; the lr follows it (blr x batch / 256)"
        fix += (
            ". A checkpoint resumes only at the batch it was saved with: the smaller batch starts a new fine-tuning "
            "(another --finetune-dir)"
        )
    return f"{first}\nto fit: {fix}"


def main(argv: list[str] | None = None) -> int:
    from fastmim.train.preempt import guard_output

    guard_output()  # (a terminal that goes while SIGHUP is ignored: the fine-tuning prints on, to /dev/null)
    ap = build_parser(_help_mode(sys.argv[1:] if argv is None else argv))
    args = ap.parse_args(argv)
    expand_home(vars(args), ("encoder", "random", "data_path", "val_path", "finetune_dir", "resume", "out"))
    _check_mode_options(ap, args, argv)
    if args.mode == "finetune" and args.resume == "if-exists":  # a job script's one command, requeued or not
        if not args.finetune_dir:
            ap.error("--resume if-exists needs --finetune-dir DIR: the folder the fine-tuning starts in, or continues "
                     "in once it holds a checkpoint")  # fmt: skip
        found = (Path(args.finetune_dir) / "checkpoint.pt").is_file()
        args.resume, args.finetune_dir = (args.finetune_dir, None) if found else (None, args.finetune_dir)
    if args.mode == "finetune" and args.resume:
        _resumed_args(ap, args, argv)
    _check(ap, args)
    from fastmim.data.folder import BadImageError
    from fastmim.eval.finetune import FinetuneStopped
    from fastmim.train.checkpoint import WriteError
    from fastmim.train.preempt import (
        INTERRUPT_EXIT,
        REQUEUE_EXIT,
        StopRequested,
        exit_status,
        stop_outside_training,
        stopped_status,
    )
    from fastmim.train.progress import check_progress_setting

    try:  # finetune: a stop signal exits with the requeue status, after a checkpoint when in training
        check_progress_setting()
        with stop_outside_training() if args.mode == "finetune" else contextlib.nullcontext():
            run(args)
    except BadImageError as e:  # (a RuntimeError: first) one line, not a loader worker's traceback
        print(f"error: {e.summary()}. Replace or remove it (python -m fastmim.data.scan FOLDER names every file that "
              "does not decode) and run again, or run with --skip-bad-files", file=sys.stderr)  # fmt: skip
        return 2
    except torch.cuda.OutOfMemoryError as e:  # (a RuntimeError: first) what would fit, not torch's page of text
        print(f"error: out of memory: {_out_of_memory_advice(args, e)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)  # (WriteError: a checkpoint or cache the file system refused)
        return 2
    except FinetuneStopped as e:
        folder = getattr(args, "run_dir", None)
        print(f"stopped on {e}" + (f"; continue with python -m fastmim.eval finetune --resume {folder}" if e.saved
                                   and folder else ""), file=sys.stderr)  # fmt: skip
        return stopped_status(exit_status(e.signame), argv)
    except KeyboardInterrupt:  # Ctrl-C outside the fine-tuning's steps, or a second one inside
        folder = getattr(args, "run_dir", None)
        saved = folder is not None and (Path(folder) / "checkpoint.pt").is_file()
        print("interrupted" + (f"; the last checkpoint is intact: continue with python -m fastmim.eval finetune "
                               f"--resume {folder}" if saved else ""), file=sys.stderr)  # fmt: skip
        return INTERRUPT_EXIT
    except StopRequested as e:
        folder = getattr(args, "run_dir", None)
        saved = folder is not None and (Path(folder) / "checkpoint.pt").is_file()
        print(f"stopped on {e} outside the fine-tuning's steps: nothing new to save, " + (
            f"its checkpoint is intact; continue with python -m fastmim.eval finetune --resume {folder}" if saved
            else "no checkpoint had been written"), file=sys.stderr)  # fmt: skip
        return stopped_status(REQUEUE_EXIT, argv)
    finally:
        if getattr(args, "dist_info", None) is not None and args.dist_info.enabled:  # torchrun's group, joined in run
            from fastmim.train.distributed import cleanup

            cleanup(args.dist_info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
