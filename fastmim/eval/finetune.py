"""Full fine-tuning of a pretrained encoder with MAE's recipe (``main_finetune.py``; ConvNeXt V2's settings and
layer numbering for a ConvNeXt: ``finetune_recipe``), built on timm's parts: the encoder's weights in timm's network
of the same shape (drop path, global-pool + fc_norm head), AdamW with layer-wise lr decay (``layer_id``: MAE's
``param_groups_lrd``, ConvNeXt V2's ``get_parameter_groups``), RandAugment ``rand-m9-mstd0.5-inc1`` and random
erasing (``timm.data.create_transform``), mixup 0.8 / cutmix 1.0 with label smoothing 0.1 (``timm.data.Mixup``),
lr = blr x batch x accum_iter x processes / 256 with a linear warm-up and a half-cosine per iteration. Evaluated on
the centre crop after every epoch; data-parallel under torchrun; a checkpoint every epoch, resumed exactly."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastmim.data import ShieldedLoader
from fastmim.eval.encoder import _autocast, check_pool, kept
from fastmim.eval.knn import percent, topk_hits
from fastmim.train.distributed import DistInfo, all_reduce_mean, barrier, wrap_ddp
from fastmim.train.optim import lr_at
from fastmim.train.preempt import PreemptionWatch, training_finished
from fastmim.train.progress import progress_bar


def _timm():
    try:
        import timm
    except ImportError as e:
        raise RuntimeError("fine-tuning builds on timm: pip install 'fastmim[eval]' (or timm)") from e
    return timm


def finetune_network(encoder: nn.Module, info: dict, num_classes: int, drop_path: float, pool: str = "auto",
                     head_init_std: float = 2e-5) -> tuple[nn.Module, list[str]]:  # fmt: skip
    """(timm's network of the encoder's shape holding its weights, with a fresh classifier; the keys it did not take
    from the encoder). ViT: ``pool`` avg/auto -> MAE's global pool (mean of the patch tokens, a new fc_norm in place
    of the final norm), cls -> the class token after the final norm; one with a relative position bias is timm's Beit
    (a shared table copied into every block, as SimMIM's and BEiT's fine-tuning). ConvNeXt V2: timm's head (pool,
    norm, fc)."""
    timm = _timm()
    state = encoder.state_dict()
    if getattr(encoder, "rel_pos_mode", None) is not None:  # a relative position bias: timm's Beit holds it
        from timm.models.beit import Beit

        from fastmim.models.vit import beit_kwargs, to_beit_state_dict

        check_pool(encoder, pool)
        token = pool == "cls"  # auto: MAE's global pool (BEiT's and SimMIM's fine-tuning too)
        kwargs = beit_kwargs(encoder) | dict(global_pool="token" if token else "avg", use_fc_norm=not token,
                                             num_classes=num_classes, drop_path_rate=drop_path)  # fmt: skip
        state = to_beit_state_dict(state)
        if kwargs["use_shared_rel_pos_bias"]:  # SimMIM's and BEiT's fine-tuning: a copy of the table in every block,
            # each trained at its block's layer-decayed rate (shared, timm would put it in the stem: 0.65^13 of the lr)
            kwargs.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
            table = state.pop("rel_pos_bias.relative_position_bias_table")
            for i in range(len(encoder.blocks)):
                state[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
        net = Beit(**kwargs)
        if not token:
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        nn.init.trunc_normal_(net.head.weight, std=head_init_std)
        nn.init.zeros_(net.head.bias)
    elif hasattr(encoder, "blocks"):  # ViT
        from timm.models.vision_transformer import VisionTransformer

        blk = encoder.blocks[0]
        has_cls = check_pool(encoder, pool)
        token = pool == "cls"  # auto: MAE's global pool
        net = VisionTransformer(
            img_size=encoder.patch_embed.img_size, patch_size=encoder.patch_size, embed_dim=encoder.embed_dim,
            depth=len(encoder.blocks), num_heads=blk.attn.num_heads,
            mlp_ratio=blk.mlp.fc1.out_features / encoder.embed_dim,
            class_token=has_cls, global_pool="token" if token else "avg", fc_norm=not token, num_classes=num_classes,
            drop_path_rate=drop_path, init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
        )  # fmt: skip
        if not token:  # MAE: the final norm gives way to fc_norm after pooling
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        nn.init.trunc_normal_(net.head.weight, std=head_init_std)  # MAE's head init (data2vec 2.0's: 0.02)
    else:
        # (ConvNeXt V2's fine-tuning scales the fresh classifier by --head_init_scale 0.001)
        net = timm.create_model(info["encoder"], pretrained=False, num_classes=num_classes, drop_path_rate=drop_path,
                                head_init_scale=0.001)  # fmt: skip
        state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"timm's {type(net).__name__} has no place for {unexpected[:4]}: not the encoder's shape")
    return net, list(missing)


def finetune(
    encoder: nn.Module,
    info: dict,
    train_set,
    val_set,
    num_classes: int,
    device: torch.device,
    *,
    epochs: int = 100,
    warmup_epochs: float = 5,
    batch_size: int = 64,
    accum_iter: int = 1,
    blr: float = 5e-4,
    min_lr: float = 1e-6,
    weight_decay: float = 0.05,
    layer_decay: float = 0.65,
    layer_decay_type: str = "single",
    drop_path: float = 0.1,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    smoothing: float = 0.1,
    model_ema: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    mixup_prob: float = 1.0,
    head_init_std: float = 2e-5,
    clip_grad: float | None = None,
    pool: str = "auto",
    workers: int = 0,
    seed: int = 0,
    dist_info: DistInfo | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    log=None,
    data_settings: dict | None = None,
    source: dict | None = None,
    progress: bool | None = None,
) -> dict:
    """Fine-tunes; returns the final and best top-1/top-5 on ``val_set``, the history and the trained network.

    ``train_set`` yields augmented views (``finetune_transform``), ``val_set`` centre crops. Under torchrun
    (``dist_info``) the network is DDP-wrapped, each process takes its share of every epoch and of the validation set
    (exact counts, summed), and lr = blr x batch x accum_iter x processes / 256. ``accum_iter``: the gradients of that
    many batches are summed before each optimizer step (MAE's --accum_iter, ConvNeXt V2's --update_freq: their
    effective batch of 1024 on fewer GPUs); the lr moves and the EMA updates once per step, an epoch takes only whole
    steps, and a stop signal is taken at a step's end. ``run_dir``: rank 0 writes ``checkpoint.pt`` there
    after every epoch (network, optimizer, history, every process's random state); ``resume`` continues from it,
    exactly as if never stopped when the number of processes is the same. ``data_settings``: what else the result
    depends on that the caller decided (the augmentation, the data, the encoder file), saved with the settings so that
    a resume with other values is refused like a changed argument. ``source``: what the encoder was when the
    fine-tuning started (its pretraining step), kept in the checkpoint and returned as ``out["source"]``: a resume
    reports the encoder it started from even if the file has been rewritten since (a pretraining run that went on).
    ``progress``: a progress bar of each epoch's steps on stderr (rank 0; None: when ``log`` is given, as the CLI)."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    dist_info = dist_info or DistInfo()
    rank, world = dist_info.rank, dist_info.world_size
    settings = dict(model=info["model"], num_classes=num_classes, batch_size=batch_size, accum_iter=accum_iter,
                    blr=blr, min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
                    layer_decay=layer_decay, layer_decay_type=layer_decay_type, param_groups=PARAM_GROUPS,
                    drop_path=drop_path, mixup=mixup, cutmix=cutmix, smoothing=smoothing, model_ema=model_ema,
                    betas=list(betas), mixup_prob=mixup_prob, head_init_std=head_init_std, clip_grad=clip_grad,
                    pool=pool, seed=seed, processes=world, **(data_settings or {}))  # fmt: skip
    classes = getattr(train_set, "classes", None)  # a LabelledFolder's: the head's output i is class i
    if classes is not None and "classes" not in settings:
        settings["classes"] = list(classes)
    settings["train_images"] = len(train_set)  # (a resume mid-epoch takes its place in the epoch's order)
    state = _load_checkpoint(run_dir, settings, epochs) if resume else None
    torch.manual_seed(seed)  # the same network on every process (DDP checks it)
    net, fresh = finetune_network(encoder, info, num_classes, drop_path, pool, head_init_std)
    net = net.to(device)
    ema = None
    if model_ema:  # ConvNeXt V2's --model_ema: an EMA of the weights and buffers after every step, evaluated too
        from timm.utils import ModelEmaV2

        ema = ModelEmaV2(net, decay=model_ema)
    if accum_iter < 1:
        raise ValueError(f"accum_iter must be at least 1, got {accum_iter}")
    lr = blr * batch_size * accum_iter * world / 256
    opt = build_optimizer(net, lr, weight_decay, layer_decay, layer_decay_type, betas)
    mixing = mixup > 0 or cutmix > 0
    if mixing and batch_size % 2:
        raise ValueError(f"mixup/cutmix mix a batch with its reverse: --batch-size must be even, got {batch_size}")
    mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, label_smoothing=smoothing,
                num_classes=num_classes) if mixing else None  # fmt: skip
    # every epoch's order from (seed, epoch), shared by the processes; the last incomplete global batch dropped
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                                  drop_last=len(train_set) >= batch_size * world)  # fmt: skip
    skip = _SkipFirst(sampler)  # a resume mid-epoch starts at the batch after the saved one
    # (the workers survive a scheduler's SIGTERM to the whole job, so that the step in flight can finish and save)
    loader = ShieldedLoader(train_set, batch_size=batch_size, sampler=skip, drop_last=True, num_workers=workers,
                            pin_memory=device.type == "cuda")  # fmt: skip
    per_epoch = len(sampler) // batch_size // accum_iter * accum_iter  # batches, whole optimizer steps only
    if per_epoch == 0:
        steps = f" x --accum-iter {accum_iter}" if accum_iter > 1 else ""
        raise ValueError(f"{len(train_set)} training images make no batch of {batch_size} per process{steps} x "
                         f"{world}: lower --batch-size" + (" or --accum-iter" if steps else ""))  # fmt: skip
    mine = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))  # each image once, over all processes
    val_loader = ShieldedLoader(mine, batch_size=batch_size, shuffle=False, num_workers=workers)
    history, best, start, first = [], None, 0, 0
    if state is not None:
        source = state.get("source", source)  # (a checkpoint from before it was kept: the file's, as given)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        history, best, start, first = state["history"], state["best"], state["epoch"], state.get("batch", 0)
        if first and len(state["rng"]) != world:
            n = len(state["rng"])
            raise ValueError(f"the fine-tuning stopped inside epoch {start + 1} on {n} processes: resume it on {n} "
                             "(each process's place in the epoch is its own)")  # fmt: skip
        _set_rng(state["rng"][rank] if len(state["rng"]) == world else None, seed, rank, start)
    else:
        _set_rng(None, seed, rank, 0)
    model = net
    if world > 1:
        model = wrap_ddp(net, device)  # (its buffers, a Beit's relative position index, are constants)
    soft_ce = SoftTargetCrossEntropy()
    watch = PreemptionWatch(dist_info).install()  # SIGTERM / SIGUSR1: the step in flight ends, then a checkpoint

    def save(epoch: int, **part) -> None:  # (a second Ctrl-C while it is written waits for it)
        with watch.saving_now():
            _save_checkpoint(run_dir, net, opt, epoch, history, best, settings, dist_info, source=source, ema=ema,
                             **part)  # fmt: skip

    val_images = None  # (the last evaluation's count; none when a resume finds every epoch done)
    try:
        for epoch in range(start, epochs):
            sampler.set_epoch(epoch)
            resumed = epoch == start and first > 0
            skip.first = first * batch_size if resumed else 0
            model.train()
            total, count, spent = torch.zeros((), device=device), 0, 0.0
            if resumed:  # the stopped epoch's sums so far: its loss is the whole epoch's
                part = state["partial"][rank]
                total, count, spent = torch.tensor(part["total"], device=device), part["count"], part["seconds"]
            t0 = time.perf_counter()
            batches = iter(loader)  # (this draws the loader's base seed from torch's generator)
            if resumed:  # the random state of the stopped step, after that draw: the next step's draws as if never
                _set_rng(state["rng"][rank], seed, rank, start)  # stopped (loader workers draw their own)
            bar = progress_bar(
                total=per_epoch,
                initial=first if resumed else 0,
                desc=f"finetune epoch {epoch + 1}/{epochs}",
                disable=not (log is not None if progress is None else progress) or not dist_info.is_main,
                dynamic_ncols=True,
                mininterval=1.0,
                leave=False,
            )  # fmt: skip (the epoch's line follows it)
            for i, (x, y) in enumerate(batches, start=first if resumed else 0):
                if i == per_epoch:  # (the epoch's last batches, too few for an optimizer step: not trained on)
                    break
                it = epoch * per_epoch + i
                stepping = (i + 1) % accum_iter == 0  # the last batch of an optimizer step
                if i % accum_iter == 0:  # a step's first batch: its lr (as MAE's, at the step's start) and fresh grads
                    for g in opt.param_groups:  # timm's layer decay: each group's lr_scale
                        g["lr"] = lr_at(it / per_epoch, lr, min_lr, warmup_epochs, epochs) * g.get("lr_scale", 1.0)
                    opt.zero_grad(set_to_none=True)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # DDP all-reduces the gradients at a step's last batch only
                sync = contextlib.nullcontext() if stepping or model is net else model.no_sync()
                with sync:
                    with _autocast(device):
                        if mix is not None:
                            x, target = mix(x, y)
                            loss = soft_ce(model(x).float(), target)
                        else:
                            loss = F.cross_entropy(model(x).float(), y, label_smoothing=smoothing)
                    (loss / accum_iter if accum_iter > 1 else loss).backward()
                if stepping:
                    if clip_grad:  # (data2vec 2.0's ViT-L/H fine-tuning: fairseq's clip_norm 4)
                        torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad)
                    opt.step()
                    if ema is not None:
                        ema.update(net)
                total += loss.detach() * len(y)
                count += len(y)
                bar.update()
                if not bar.disable and (i + 1) % 20 == 0:  # (the loss: one host read every 20 steps)
                    bar.set_postfix(loss=f"{float(total) / count:.4f}", refresh=False)
                # (every rank asks at every optimizer step's end: a collective)
                if stepping and i + 1 < per_epoch and watch.requested():
                    bar.close()
                    if run_dir is not None:
                        part = {"total": float(total), "count": count, "seconds": spent + time.perf_counter() - t0}
                        save(epoch, batch=i + 1, partial=part)
                    training_finished()  # stopped: a stop signal while the command tears down changes nothing
                    raise FinetuneStopped(watch.signame, epoch, i + 1, per_epoch, run_dir is not None)
            bar.close()
            del batches  # (left before its end, with --accum-iter: its workers go before the validation's start)
            mean_loss = float(all_reduce_mean(total / count, dist_info))
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"the fine-tuning loss became {mean_loss} in epoch {epoch + 1}; lower --blr "
                                         "(the last checkpoint is intact)")  # fmt: skip
            acc = evaluate(net, val_loader, num_classes, device, dist_info)
            val_images = acc.pop("images")  # (fewer than the folder's: unreadable ones skipped)
            if not val_images:
                raise ValueError("no image of the validation folder can be read (the last checkpoint is intact)")
            if ema is not None:  # (ConvNeXt V2 reports the EMA's accuracy: --model_ema_eval)
                acc.update({f"{k}_ema": v for k, v in evaluate(ema.module, val_loader, num_classes, device,
                                                                 dist_info).items() if k != "images"})  # fmt: skip
            row = {"epoch": epoch + 1, "loss": mean_loss, **acc,
                   "seconds": round(spent + time.perf_counter() - t0, 2)}  # fmt: skip
            history.append(row)
            best = row if best is None or row["top1"] > best["top1"] else best
            if run_dir is not None:
                save(epoch + 1)
            if log is not None and dist_info.is_main:
                log(row)
            if epoch + 1 < epochs and watch.requested():  # a signal during the validation: the epoch is saved
                training_finished()
                raise FinetuneStopped(watch.signame, epoch + 1, 0, per_epoch, run_dir is not None)
        training_finished()  # the last epoch is saved: a stop signal from now on (the outputs' writing) is ignored
    finally:
        watch.close()
    last = history[-1]
    out = {"top1": last["top1"], "top5": last["top5"], "best_top1": best["top1"], "best_epoch": best["epoch"],
           "lr": lr, "history": history, "network": net.cpu(), "fresh_keys": fresh, "source": source,
           "val_images": val_images}  # fmt: skip
    if ema is not None:
        best_ema = max(history, key=lambda r: r["top1_ema"])
        out.update(top1_ema=last["top1_ema"], top5_ema=last["top5_ema"], best_top1_ema=best_ema["top1_ema"],
                   best_epoch_ema=best_ema["epoch"], network_ema=ema.module.cpu())  # fmt: skip
    return out


CHECKPOINT = "checkpoint.pt"


class FinetuneStopped(Exception):
    """SIGTERM, SIGUSR1 or Ctrl-C stopped the fine-tuning at a step boundary, after a checkpoint there (when it has a
    folder); ``epoch`` epochs and ``batch`` batches of the next were done."""

    def __init__(self, signame: str, epoch: int, batch: int, per_epoch: int, saved: bool):
        where = f"epoch {epoch + 1}, batch {batch} of {per_epoch}" if batch else f"the end of epoch {epoch}"
        super().__init__(f"{signame}: " + (f"checkpointed at {where}" if saved else f"stopped at {where}, no folder "
                                           "to checkpoint in"))  # fmt: skip
        self.signame, self.epoch, self.batch, self.saved = signame, epoch, batch, saved


class _SkipFirst(torch.utils.data.Sampler):
    """A sampler's order without its ``first`` indices (a resume inside an epoch)."""

    def __init__(self, sampler):
        self.sampler, self.first = sampler, 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.first, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.first


def _set_rng(saved: dict | None, seed: int, rank: int, epoch: int) -> None:
    """Each process's augmentation, mixup and drop-path randomness: its saved state, else from (seed, rank, epoch)."""
    import random

    import numpy as np

    if saved is None:
        s = (seed * 1_000_003 + rank * 7919 + epoch) % 2**31
        random.seed(s), np.random.seed(s), torch.manual_seed(s)
        return
    from fastmim.train.checkpoint import set_numpy_rng_state

    random.setstate(saved["python"])
    set_numpy_rng_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if saved.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


def _rng_state() -> dict:
    import random

    from fastmim.train.checkpoint import numpy_rng_state

    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def _save_checkpoint(run_dir, net, opt, epoch, history, best, settings, dist_info: DistInfo, batch: int = 0,
                     partial: dict | None = None, source: dict | None = None, ema=None) -> None:  # fmt: skip
    """``epoch`` epochs done, and ``batch`` batches of the next (a stop inside it: ``partial``, this process's loss
    sums and seconds of that epoch so far)."""
    from fastmim.train.checkpoint import atomic_write

    mine = [(_rng_state(), partial)]
    if dist_info.enabled:
        import torch.distributed as dist

        mine = [None] * dist_info.world_size
        dist.all_gather_object(mine, (_rng_state(), partial))
    if dist_info.is_main:
        state = {"net": net.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "batch": batch,
                 "history": history, "best": best, "settings": settings, "rng": [r for r, _ in mine],
                 "source": source}  # fmt: skip
        if batch:
            state["partial"] = [p for _, p in mine]
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        atomic_write(Path(run_dir) / CHECKPOINT, lambda tmp: torch.save(state, tmp))
    barrier(dist_info)


def _load_checkpoint(run_dir, settings: dict, epochs: int) -> dict:
    path = Path(run_dir or ".") / CHECKPOINT
    if run_dir is None or not path.is_file():
        raise FileNotFoundError(f"no fine-tuning checkpoint at {str(path)!r} to resume")
    from fastmim.train.checkpoint import safe_load

    state = safe_load(path)  # (an older one's numpy RNG state is an ndarray: allowed; no other object is unpickled)
    saved = {"accum_iter": 1, **state["settings"]}  # (one from before a setting was recorded is not refused for it;
    # before --accum-iter, every fine-tuning summed one batch per step)
    if saved.get("param_groups") != settings["param_groups"]:
        raise ValueError(
            f"--resume {str(run_dir)!r}: the fine-tuning was started by an earlier fastmim, whose "
            "optimizer grouped the parameters as timm does; its state does not fit the official "
            "recipes' groups used now: start it again (or finish it with the fastmim that started it)"
        )
    if "classes" in saved and "classes" in settings and list(saved["classes"]) != list(settings["classes"]):
        raise ValueError(f"--resume {str(run_dir)!r}: the training folder's classes have changed since the fine-tuning "
                         f"started ({_class_change(saved['classes'], settings['classes'])}): its head's outputs are "
                         "the classes it started with; restore the class folders' names or start a new "
                         "fine-tuning")  # fmt: skip
    now, then = settings.get("train_images"), saved.get("train_images")
    if state.get("batch") and then is not None and now is not None and now != then:
        raise ValueError(f"--resume {str(run_dir)!r}: the fine-tuning stopped inside epoch {state['epoch'] + 1} with "
                         f"{then} training images; the training folder holds {now} now, so its place in that epoch's "
                         f"order is lost: restore the {then} images to finish the epoch (a changed folder is read from "
                         "the next)")  # fmt: skip
    differ = {k: (saved.get(k), v) for k, v in settings.items()
              if k not in ("processes", "train_images") and k in saved and saved[k] != v}  # fmt: skip
    if differ:
        said = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(f"--resume {str(run_dir)!r}: the fine-tuning was started with other settings ({said})")
    if state["epoch"] >= epochs:
        raise ValueError(
            f"--resume {str(run_dir)!r}: it has done {state['epoch']} of --epochs {epochs}; raise --epochs"
        )
    if state["settings"].get("processes") != settings["processes"]:
        print(f"note: resumed on {settings['processes']} processes, saved on {state['settings'].get('processes')}: "
              "the same schedule, other random draws", flush=True)  # fmt: skip
    return state


def _named(name: str) -> str:
    """A class name as a message shows it: repr, or ascii where that hides a difference (a re-normalised 'café')."""
    return repr(name) if name.isascii() or unicodedata.is_normalized("NFC", name) else ascii(name)


def _class_change(then: list[str], now: list[str]) -> str:
    """What differs between two class lists, in words: the names gone and new, or the labels that moved."""
    gone, new = [c for c in then if c not in now], [c for c in now if c not in then]
    said = [f"{', '.join(_named(c) for c in names[:5])}{' ...' if len(names) > 5 else ''} {what}"
            for names, what in ((gone, "gone"), (new, "new")) if names]  # fmt: skip
    if not said:
        moved = [i for i, (a, b) in enumerate(zip(then, now, strict=False)) if a != b] or [0]
        said = [
            f"the same names in another order: label {moved[0]} was {_named(then[moved[0]])}, now "
            f"{_named(now[moved[0]])}"
        ]
    return "; ".join(said) + f" ({len(then)} classes then, {len(now)} now)"


@torch.no_grad()
def evaluate(net: nn.Module, loader, num_classes: int, device: torch.device,
             dist_info: DistInfo | None = None) -> dict[str, float]:  # fmt: skip
    """Top-1/top-5 (%) over the loader's images (each process its share: the counts are summed), those labelled
    ``LEFT_OUT`` (unreadable, skipped) left out, and "images": how many were scored."""
    net.eval()
    hits = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, images
    for x, y in loader:
        with _autocast(device):
            scores = net(x.to(device, non_blocking=True)).float()
        y, scores = kept(y, scores)
        hits += topk_hits(scores, y, num_classes)
    if dist_info is not None and dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(hits)
    return {**percent(hits), "images": int(hits[2])}


def finetune_transform(img_size: int, auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25):
    """MAE's fine-tuning view (timm's ``create_transform``): RandomResizedCrop (bicubic), flip, RandAugment, random
    erasing (per pixel)."""
    _timm()
    from timm.data import auto_augment as aa
    from timm.data import create_transform

    from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD

    tf = create_transform(input_size=img_size, is_training=True, color_jitter=None, auto_augment=auto_augment,
                          interpolation="bicubic", re_prob=re_prob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD)  # fmt: skip
    for t in getattr(tf, "transforms", []):  # RandAugment's posterize ops: see posterize_keeping below
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is aa.posterize:
                op.aug_fn = posterize_keeping
    return tf


def posterize_keeping(img, bits_to_keep: int, **_):
    """timm's posterize (keep the ``bits_to_keep`` high bits) for any count: ``inc1`` policies reach 0 bits at
    magnitude 10 (m9 with mstd 0.5 samples it), which Pillow 13 refuses where earlier Pillow gave a black image
    (all bits dropped): that image again."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


# The official fine-tuning recipes: python -m fastmim.eval finetune's defaults for the encoder (``finetune_recipe``)
_MAE_B = dict(epochs=100, warmup_epochs=5, blr=5e-4, layer_decay=0.65, layer_decay_type="single", drop_path=0.1,
              weight_decay=0.05, mixup=0.8, cutmix=1.0, smoothing=0.1, model_ema=0.0, min_lr=1e-6)  # fmt: skip
_MAE_L = _MAE_B | dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2)
_CONVNEXT_A = dict(epochs=600, warmup_epochs=0, blr=2e-4, layer_decay=0.9, layer_decay_type="single", drop_path=0.1,
                   weight_decay=0.3, mixup=0.0, cutmix=0.0, smoothing=0.2, model_ema=0.9999, min_lr=1e-6)  # fmt: skip
_CONVNEXT_T = dict(epochs=300, warmup_epochs=40, blr=8e-4, layer_decay=0.9, layer_decay_type="single", drop_path=0.2,
                   weight_decay=0.05, mixup=0.8, cutmix=1.0, smoothing=0.1, model_ema=0.9999, min_lr=1e-6)  # fmt: skip
_CONVNEXT_B = _CONVNEXT_T | dict(epochs=100, warmup_epochs=20, blr=6.25e-4, layer_decay=0.6, layer_decay_type="group",
                                 drop_path=0.1)  # fmt: skip
# data2vec 2.0's image fine-tuning (fairseq mae_image_classification.py, vision/finetuning/mae_imagenet_clean.yaml):
# lr 1e-3 at batch 512 (blr 5e-4), 250,200 updates (100 epochs) with 16,000 of warm-up (6.4 epochs), mixup 0.7
# applied to 90% of the batches, cutmix 1.0, smoothing 0.1, layer decay 0.65 over the blocks only
_DATA2VEC2 = _MAE_B | dict(warmup_epochs=6.4, mixup=0.7, layer_decay_type="blocks")
# ViT-L and ViT-H (mae_imagenet_large_clean.yaml, mae_imagenet_huge_clean.yaml): lr 5e-4 at 512 (blr 2.5e-4), 125,200
# updates (50 epochs), layer decay 0.75, drop path 0.2, gradients clipped at norm 4, the cosine to 1e-7 (L) or 1e-20
_DATA2VEC2_L = _DATA2VEC2 | dict(epochs=50, blr=2.5e-4, layer_decay=0.75, drop_path=0.2, min_lr=1e-7)
_DATA2VEC2_H = _DATA2VEC2_L | dict(min_lr=1e-20)
DATA2VEC2_RECIPES = {"base": ("data2vec 2.0's (fairseq mae_imagenet_clean.yaml)", _DATA2VEC2),
                     "large": ("data2vec 2.0's ViT-L (fairseq mae_imagenet_large_clean.yaml)", _DATA2VEC2_L),
                     "huge": ("data2vec 2.0's ViT-H (fairseq mae_imagenet_huge_clean.yaml)", _DATA2VEC2_H)}  # fmt: skip
RECIPES = {  # encoder size -> (the recipe's source, its settings)
    "vit_base": ("MAE's ViT-B (FINETUNE.md)", _MAE_B),
    "vit_large": ("MAE's ViT-L (FINETUNE.md)", _MAE_L),
    "vit_huge": ("MAE's ViT-H (FINETUNE.md)", _MAE_L | dict(drop_path=0.3)),
    "convnextv2_atto": ("ConvNeXt V2's Atto (TRAINING.md)", _CONVNEXT_A),
    "convnextv2_tiny": ("ConvNeXt V2's Tiny (TRAINING.md)", _CONVNEXT_T),
    "convnextv2_base": ("ConvNeXt V2's Base (TRAINING.md)", _CONVNEXT_B),
}
_NEAREST = {"vit": "vit_base", "vit_giant": "vit_huge", "convnextv2_femto": "convnextv2_atto",
            "convnextv2_pico": "convnextv2_atto", "convnextv2_nano": "convnextv2_atto",
            "convnextv2_large": "convnextv2_base", "convnextv2_huge": "convnextv2_base"}  # fmt: skip
RECIPE_KEYS = tuple(_MAE_B)


def recipe_batch(encoder_name: str, model_name: str | None = None) -> int:
    """The effective batch (per step, over all processes) of the recipe ``finetune_recipe`` gives: 1024 for MAE's
    (32 x 8 GPUs x accum 4) and ConvNeXt V2's (32 x 32 GPUs), 512 for data2vec 2.0's. Its blr scales to that batch."""
    d2v = _data2vec2_size(model_name) if encoder_name.startswith("vit_") else None
    return 512 if d2v is not None else 1024


# what a recipe sets that is no command-line option: AdamW's betas, the share of batches mixed, the head's init
_D2V_EXTRAS = dict(betas=(0.9, 0.95), mixup_prob=0.9, head_init_std=0.02, clip_grad=None)
RECIPE_EXTRAS = {"mae": dict(betas=(0.9, 0.999), mixup_prob=1.0, head_init_std=2e-5, clip_grad=None),
                 "data2vec2": _D2V_EXTRAS, "data2vec2_large": _D2V_EXTRAS | dict(clip_grad=4.0)}  # fmt: skip


def _data2vec2_size(name: str | None) -> str | None:
    """A data2vec 2.0 run's model (``data2vec2_vit_large_patch16``): which of fairseq's fine-tuning configs is its,
    "base", "large" (ViT-L) or "huge" (ViT-H and ViT-g); None for another recipe's."""
    name = str(name or "")
    if not name.startswith("data2vec2_vit_"):
        return None
    vit = name.removeprefix("data2vec2_")
    return "large" if vit.startswith("vit_large") else "huge" if vit.startswith(("vit_huge", "vit_giant")) else "base"


def recipe_extras(model_name: str | None) -> dict:
    """``RECIPE_EXTRAS`` of the recipe a run's encoder came from (its metadata's model: data2vec2_..., mae_...)."""
    size = _data2vec2_size(model_name)
    return RECIPE_EXTRAS["mae" if size is None else "data2vec2" if size == "base" else "data2vec2_large"]


def finetune_recipe(encoder_name: str, model_name: str | None = None) -> tuple[str, dict]:
    """(where it comes from, the settings) of the official fine-tuning recipe for encoder ``encoder_name``
    (``vit_base_patch16``, ``convnextv2_atto``, ...): MAE's for ViT-B, -L and -H (smaller ViTs take ViT-B's, ViT-g
    ViT-H's), ConvNeXt V2's for Atto, Tiny and Base (Femto to Nano take Atto's, Large and Huge Base's), which keep an
    EMA of the weights (decay 0.9999) and report its accuracy too; a data2vec 2.0 run's ViT (``model_name``, its
    encoder file's metadata: ``data2vec2_...``) takes fairseq's (``_DATA2VEC2``, with ``RECIPE_EXTRAS``)."""
    d2v = _data2vec2_size(model_name) if encoder_name.startswith("vit_") else None
    if d2v is not None:
        return DATA2VEC2_RECIPES[d2v]
    size = "_".join(encoder_name.split("_")[:2]) if encoder_name.startswith(("vit_", "convnextv2_")) else ""
    if size in RECIPES:
        return RECIPES[size]
    near = _NEAREST.get(size, "convnextv2_base" if encoder_name.startswith("convnext") else "vit_base")
    where, settings = RECIPES[near]
    return f"{where[:-1]}; the nearest published one)", settings


PARAM_GROUPS = "official-lrd-2"  # (in a checkpoint's settings: one from timm's groups, before, is not resumed)
LAYER_DECAY_TYPES = ("single", "group", "blocks")


def layer_id(name: str, net: nn.Module, layer_decay_type: str = "single") -> tuple[int, int]:
    """(layer of parameter ``name``, number of layers L) for layer-wise lr decay, as the official fine-tuning codes
    number them; a parameter at layer i trains at ``layer_decay ** (L - i)`` of the lr.

    ViT (MAE's ``util/lr_decay.py``): class token, position embedding and patch embedding 0, block i i + 1, all the
    rest (final norm, fc_norm, head) L = blocks + 1. ConvNeXt V2 (its ``optim_factory.py``), with timm's names:
    ``single``: stage s's downsampling (the stem for s = 0) and its first block sum(depths[:s]) + 1, block j of stage s
    sum(depths[:s]) + j + 1, the head L = sum(depths) + 1; ``group`` (the official recipe for Base and larger): 12
    groups: stem 0, stages 0 and 1 (with stage 1's downsampling) 1 and 2, stage 2's downsampling 3 and its blocks
    3 + j // 3, stage 3 and its downsampling 12, the head L = 13. ``blocks`` (a ViT; data2vec 2.0's fine-tuning):
    only the blocks are decayed, everything else is at the head's rate."""
    parts = name.split(".")
    if hasattr(net, "blocks"):  # ViT, Beit
        top = len(net.blocks) + 1
        if parts[0] in ("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token"):
            return (top if layer_decay_type == "blocks" else 0), top
        return (int(parts[1]) + 1 if parts[0] == "blocks" else top), top
    depths = [len(stage.blocks) for stage in net.stages]
    stage = 0 if parts[0] == "stem" else int(parts[1]) if parts[0] == "stages" else None
    block = int(parts[3]) if parts[0] == "stages" and parts[2] == "blocks" else None  # None: the downsampling
    if layer_decay_type == "single":
        top = sum(depths) + 1
        if stage is None:
            return top, top
        return sum(depths[:stage]) + (block or 0) + 1, top
    if stage is None:
        return 13, 13
    if stage == 3:
        return 12, 13
    if block is None:  # the stem, or the downsampling in front of stage 1 or 2
        return (0 if stage == 0 else stage + 1), 13
    return (stage + 1 if stage < 2 else 3 + block // 3), 13


def param_groups(net: nn.Module, weight_decay: float, layer_decay: float, layer_decay_type: str = "single") -> list:
    """The optimizer's parameter groups, one per (layer, decayed or not), each with ``lr_scale`` (``layer_id``) and
    its weight decay: none for biases, one-dimensional parameters (norms, GRN) and the network's
    ``no_weight_decay()`` names (class token, position embedding, relative position tables), as MAE's
    ``param_groups_lrd`` and ConvNeXt V2's ``get_parameter_groups``."""
    if layer_decay_type not in LAYER_DECAY_TYPES:
        raise ValueError(f"layer_decay_type must be one of {LAYER_DECAY_TYPES}, got {layer_decay_type!r}")
    vit = hasattr(net, "blocks")
    if (layer_decay_type == "group" and vit) or (layer_decay_type == "blocks" and not vit):
        raise ValueError(f"layer_decay_type {layer_decay_type!r} is for a {'ConvNeXt' if vit else 'ViT'}; this is a "
                         f"{type(net).__name__}")  # fmt: skip
    skip = set(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name.endswith(".bias") or name in skip)
        layer, top = layer_id(name, net, layer_decay_type)
        group = groups.setdefault((layer, decay), {"params": [], "names": [], "lr_scale": layer_decay ** (top - layer),
                                                   "weight_decay": weight_decay if decay else 0.0})  # fmt: skip
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(net: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.65,
                    layer_decay_type: str = "single", betas: tuple[float, float] = (0.9, 0.999)):  # fmt: skip
    """AdamW (MAE's betas 0.9, 0.999; data2vec 2.0's 0.9, 0.95) over ``param_groups``; the loop sets each group's lr
    to the schedule's times its ``lr_scale``."""
    return torch.optim.AdamW(param_groups(net, weight_decay, layer_decay, layer_decay_type), lr=lr,
                             betas=tuple(betas))  # fmt: skip
