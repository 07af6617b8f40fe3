"""Registers the plain encoders: vit_{tiny,small,base,large,huge}_patch{14,16} and convnextv2_{atto,...,huge}."""

from __future__ import annotations

import functools

from fastmim.models.convnextv2 import ConvNeXtV2, convnextv2_sizes
from fastmim.models.registry import register_model
from fastmim.models.vit import VisionTransformer, vit_sizes


def _build(size: str, patch: int, **kwargs) -> VisionTransformer:
    return VisionTransformer(**{"patch_size": patch, **vit_sizes()[size], **kwargs})


for _size in vit_sizes():
    for _patch in (14, 16):
        register_model(f"vit_{_size}_patch{_patch}", functools.partial(_build, _size, _patch))


def _build_convnextv2(size: str, **kwargs) -> ConvNeXtV2:
    return ConvNeXtV2(**{**convnextv2_sizes()[size], **kwargs})


for _size in convnextv2_sizes():
    register_model(f"convnextv2_{_size}", functools.partial(_build_convnextv2, _size))
