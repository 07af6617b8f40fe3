"""lightly's MAE trained with fastmim's ops: lightly's modules (``MaskedVisionTransformerTIMM`` around a timm ViT,
``MAEDecoderTIMM``) and lightly's masks, with the gather, the decoder's input and the loss from
``fastmim.integrations.lightly``.

    python examples/lightly_mae.py                          # ViT-B/16 at 224 px on the built-in photos
    python examples/lightly_mae.py --data-path /data/train --epochs 100 --batch-size 256
    python examples/lightly_mae.py --model vit_tiny_patch16_224 --img-size 64 --steps 20   # a quick CPU run

Needs lightly and timm (``pip install -e '.[lightly]'`` from a checkout: fastmim is not on PyPI).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from torch import nn


class LightlyMAE(nn.Module):
    """lightly's MAE example model; the forward uses fastmim's equivalents of lightly's helpers."""

    def __init__(self, vit: nn.Module, decoder_dim: int = 512, decoder_depth: int = 1, mask_ratio: float = 0.75,
                 norm_pix: bool = True):  # fmt: skip
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

        super().__init__()
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # lightly 1.6 renames the decoder (a FutureWarning
            warnings.simplefilter("ignore", FutureWarning)  # in 1.6.x: MaskedVisionTransformerDecoderTIMM)
            self.decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=self.patch_size,
                                          embed_dim=vit.embed_dim, decoder_embed_dim=decoder_dim,
                                          decoder_depth=decoder_depth, decoder_num_heads=16)  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lightly.models import utils

        from fastmim.integrations import lightly as fl

        idx_keep, idx_mask = utils.random_token_mask((images.shape[0], self.sequence_length), self.mask_ratio,
                                                     device=images.device)  # fmt: skip
        x = self.decoder.embed(self.backbone.encode(images=images, idx_keep=idx_keep))
        x = fl.decode_masked(self.decoder, x, idx_keep, idx_mask)
        pred = self.decoder.predict(fl.get_at_index(x, idx_mask))
        return fl.mae_loss(pred, images, idx_mask, self.patch_size, norm_pix=self.norm_pix)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224", help="a timm ViT name")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--data-path", help="image folder (default: fastmim's built-in photos)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=None, help="passes over the data (default 1; with --steps, as many "
                    "as the steps need)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=None, help="train this many steps (over as many epochs as they take, "
                    "unless --epochs stops it first)")  # fmt: skip
    ap.add_argument("--lr", type=float, default=1.5e-4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        import lightly  # noqa: F401
        import timm
    except ImportError as e:
        print(f"error: {e.name} is missing: pip install 'fastmim[lightly]'", file=sys.stderr)
        return 2
    from fastmim.data import ImageFolderDataset, default_dataset_path, pretrain_transform
    from fastmim.integrations import lightly as fl

    fl.patch_lightly()  # lightly's own encoder gathers with fastmim's op too
    device = torch.device(args.device)
    try:
        vit = timm.create_model(args.model, img_size=args.img_size, num_classes=0)
    except (RuntimeError, TypeError) as e:  # an unknown name, or a model without img_size (not a ViT)
        print(f"error: --model {args.model}: {e} (a timm ViT name, e.g. vit_tiny_patch16_224)", file=sys.stderr)
        return 2
    if not hasattr(vit, "patch_embed"):
        print(f"error: --model {args.model} is not a timm ViT (lightly's MAE masks ViT patches)", file=sys.stderr)
        return 2
    model = LightlyMAE(vit).to(device)
    data = ImageFolderDataset(args.data_path or default_dataset_path(), pretrain_transform(args.img_size))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=0)  # fmt: skip
    if len(loader) == 0:
        print(f"error: {len(data)} images make no batch of {args.batch_size}", file=sys.stderr)
        return 2
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    gpu = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    step, t0 = 0, time.perf_counter()
    epochs = args.epochs if args.epochs is not None else 1 if args.steps is None else -(-args.steps // len(loader))
    for epoch in range(epochs):
        for batch in loader:
            images = (batch[0] if isinstance(batch, list | tuple) else batch).to(device, non_blocking=True)
            with amp:
                loss = model(images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            print(f"epoch {epoch + 1} step {step}: loss {loss.item():.4f}", flush=True)
            if args.steps is not None and step >= args.steps:
                break
        if args.steps is not None and step >= args.steps:
            break
    print(f"done: {step} steps, {step * args.batch_size / (time.perf_counter() - t0):.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
