"""Full fine-tuning of a pretrained encoder with MAE's recipe (``main_finetune.py``), built on timm's parts: the
encoder's weights in timm's network of the same shape (drop path, global-pool + fc_norm head), AdamW with layer-wise
lr decay (timm's ``param_groups_layer_decay``: MAE's ``lrd``), RandAugment ``rand-m9-mstd0.5-inc1`` and random
erasing (``timm.data.create_transform``), mixup 0.8 / cutmix 1.0 with label smoothing 0.1 (``timm.data.Mixup``),
lr = blr x batch / 256 with a linear warm-up and a half-cosine per iteration. Evaluated on the centre crop after every
epoch; one process (a run on ImageNet wants several GPUs: not yet)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from fastmim.eval.encoder import _autocast
from fastmim.eval.knn import _topk_accuracy
from fastmim.train.optim import lr_at


def _timm():
    try:
        import timm
    except ImportError as e:
        raise RuntimeError("fine-tuning builds on timm: pip install 'fastmim[eval]' (or timm)") from e
    return timm


def finetune_network(encoder: nn.Module, info: dict, num_classes: int, drop_path: float, pool: str = "auto") -> tuple[
        nn.Module, list[str]]:  # fmt: skip
    """(timm's network of the encoder's shape holding its weights, with a fresh classifier; the keys it did not take
    from the encoder). ViT: ``pool`` avg/auto -> MAE's global pool (mean of the patch tokens, a new fc_norm in place
    of the final norm), cls -> the class token after the final norm. ConvNeXt V2: timm's head (pool, norm, fc)."""
    timm = _timm()
    state = encoder.state_dict()
    if hasattr(encoder, "blocks"):  # ViT
        from timm.models.vision_transformer import VisionTransformer

        blk = encoder.blocks[0]
        has_cls = getattr(encoder, "cls_token", None) is not None
        if pool == "cls" and not has_cls:
            raise ValueError("--pool cls: this ViT has no class token (I-JEPA's); use --pool avg")
        token = pool == "cls"
        net = VisionTransformer(
            img_size=encoder.patch_embed.img_size, patch_size=encoder.patch_size, embed_dim=encoder.embed_dim,
            depth=len(encoder.blocks), num_heads=blk.attn.num_heads,
            mlp_ratio=blk.mlp.fc1.out_features / encoder.embed_dim,
            class_token=has_cls, global_pool="token" if token else "avg", fc_norm=not token, num_classes=num_classes,
            drop_path_rate=drop_path,
        )  # fmt: skip
        if not token:  # MAE: the final norm gives way to fc_norm after pooling
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        nn.init.trunc_normal_(net.head.weight, std=2e-5)  # MAE's head init
    else:
        net = timm.create_model(info["encoder"], pretrained=False, num_classes=num_classes, drop_path_rate=drop_path)
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
    blr: float = 5e-4,
    min_lr: float = 1e-6,
    weight_decay: float = 0.05,
    layer_decay: float = 0.65,
    drop_path: float = 0.1,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    smoothing: float = 0.1,
    pool: str = "auto",
    workers: int = 0,
    seed: int = 0,
    log=None,
) -> dict:
    """Fine-tunes; returns the final and best top-1/top-5 on ``val_set``, the history and the trained network.
    ``train_set`` yields augmented views (``finetune_transform``), ``val_set`` centre crops."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net, fresh = finetune_network(encoder, info, num_classes, drop_path, pool)
    net = net.to(device)
    lr = blr * batch_size / 256
    opt = build_optimizer(net, lr, weight_decay, layer_decay)
    mixing = mixup > 0 or cutmix > 0
    mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes) if mixing \
        else None  # fmt: skip
    if mixing and batch_size % 2:
        raise ValueError(f"mixup/cutmix mix a batch with its reverse: --batch-size must be even, got {batch_size}")
    drop_last = len(train_set) >= batch_size
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                                         num_workers=workers, generator=gen,
                                         pin_memory=device.type == "cuda")  # fmt: skip
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=workers)
    per_epoch = len(loader)
    soft_ce = SoftTargetCrossEntropy()
    history, best, it = [], None, 0
    for epoch in range(epochs):
        net.train()
        total, count, t0 = 0.0, 0, time.perf_counter()
        for x, y in loader:
            for g in opt.param_groups:  # timm's layer decay: each group's lr_scale
                g["lr"] = lr_at(it / per_epoch, lr, min_lr, warmup_epochs, epochs) * g.get("lr_scale", 1.0)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mix is not None and len(x) % 2 == 0:
                x, target = mix(x, y)
                with _autocast(device):
                    loss = soft_ce(net(x).float(), target)
            else:
                with _autocast(device):
                    loss = F.cross_entropy(net(x).float(), y, label_smoothing=smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the fine-tuning loss became {float(loss)} in epoch {epoch}; lower --blr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
            it += 1
        acc = evaluate(net, val_loader, num_classes, device)
        row = {"epoch": epoch + 1, "loss": total / max(count, 1), **acc, "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        best = row if best is None or row["top1"] > best["top1"] else best
        if log is not None:
            log(row)
    last = history[-1]
    return {"top1": last["top1"], "top5": last["top5"], "best_top1": best["top1"], "best_epoch": best["epoch"],
            "lr": lr, "history": history, "network": net.cpu(), "fresh_keys": fresh}  # fmt: skip


@torch.no_grad()
def evaluate(net: nn.Module, loader, num_classes: int, device: torch.device) -> dict[str, float]:
    net.eval()
    logits, labels = [], []
    for x, y in loader:
        with _autocast(device):
            logits.append(net(x.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
    return _topk_accuracy(torch.cat(logits), torch.cat(labels), num_classes)


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


def build_optimizer(net: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.65):
    """AdamW over timm's layer-decay groups: each group's ``lr_scale`` is ``layer_decay ** (L - layer)`` (the patch
    embedding, class token and position embedding layer 0, block i layer i + 1, the head L = blocks + 1), and
    one-dimensional parameters and the model's ``no_weight_decay()`` names have no weight decay."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(net, "adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
