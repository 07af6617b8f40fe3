"""The Mask module: which patches to hide.

``build_mask(name, grid, **params)`` gives one of the strategies in ``STRATEGIES`` (random, block, inverse_block,
simmim, uniform, multiblock, tube, attention, hardpatch; see ``fastmim.masking.strategies``); calling it returns
``Masks``. Masks are a pure function of (seed, epoch, sample index). ``python -m fastmim.masking.show`` draws them over
an image.
"""

from fastmim.masking.base import Masks, MaskStrategy
from fastmim.masking.block import BlockMaskConfig, BlockMaskGenerator, block_mask_ref
from fastmim.masking.random import (
    MaskInfo,
    mask_only,
    masking_from_bool,
    masking_from_noise,
    num_visible,
    random_masking,
)
from fastmim.masking.strategies import (
    STRATEGIES,
    AttentionMask,
    BlockMask,
    HardPatchMask,
    MultiBlockMask,
    RandomMask,
    SimMIMMask,
    TubeMask,
    UniformMask,
    build_mask,
)

__all__ = [
    "STRATEGIES",
    "AttentionMask",
    "BlockMask",
    "BlockMaskConfig",
    "BlockMaskGenerator",
    "HardPatchMask",
    "MaskInfo",
    "MaskStrategy",
    "Masks",
    "MultiBlockMask",
    "RandomMask",
    "SimMIMMask",
    "TubeMask",
    "UniformMask",
    "block_mask_ref",
    "build_mask",
    "mask_only",
    "masking_from_bool",
    "masking_from_noise",
    "num_visible",
    "random_masking",
]
