"""The Mask module: which patches to hide."""

from fastmim.masking.block import BlockMaskConfig, BlockMaskGenerator, block_mask_ref
from fastmim.masking.random import MaskInfo, masking_from_bool, masking_from_noise, num_visible, random_masking

__all__ = [
    "BlockMaskConfig",
    "BlockMaskGenerator",
    "MaskInfo",
    "block_mask_ref",
    "masking_from_bool",
    "masking_from_noise",
    "num_visible",
    "random_masking",
]
