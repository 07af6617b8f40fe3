"""Registers the plain ViT encoders: vit_{tiny,small,base,large,huge}_patch{14,16}."""

from __future__ import annotations

import functools

from fastmim.models.registry import register_model
from fastmim.models.vit import VisionTransformer, vit_sizes


def _build(size: str, patch: int, **kwargs) -> VisionTransformer:
    return VisionTransformer(**{"patch_size": patch, **vit_sizes()[size], **kwargs})


for _size in vit_sizes():
    for _patch in (14, 16):
        register_model(f"vit_{_size}_patch{_patch}", functools.partial(_build, _size, _patch))
