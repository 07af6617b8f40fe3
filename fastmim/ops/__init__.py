"""fastmim.ops: fused masked-modeling ops, importable on their own (``from fastmim.ops import masked_mse_loss``).
Every op has a plain PyTorch reference (``*_ref``) that defines its semantics. Backends: CUDA C++ (``fastmim._cuda``)
or Triton for CUDA tensors, whichever measured faster for the op; C++ (``fastmim._C``, OpenMP) for CPU tensors
(``grn``, which has no C++ kernel: its PyTorch formulation); the reference otherwise. ``FASTMIM_BACKEND=cuda|triton|
cpp|torch`` or ``set_backend(name)`` forces one. ``add_layer_norm`` fuses a pre-norm transformer block's residual
add with the LayerNorm after it (``layer_norm``: the LayerNorm alone, written in the next matmul's dtype),
``bias_gelu`` an MLP's bias with its GELU (the backward with the bias gradient);
``hog_target``, ``fft_loss``, ``patch_fft_loss`` and ``low_pass_target`` are MaskFeat's target, A2MIM's loss, the
patch-wise focal frequency loss and PixMIM's target. All but ``resized_crop`` (the random-resized-crop augmentation
of a batch of GPU-decoded images, in two launches) are ``torch.library`` custom ops (``torch.ops.fastmim.*``) with
fake kernels and autograd, safe under ``torch.compile(fullgraph=True)``; ``set_compiled_ops("triton")`` (or
``FASTMIM_COMPILED_OPS=triton``) lets inductor see and launch the Triton kernels of the token ops, the masked losses
and patchify itself instead of calling the opaque ops. Module forms: ``MaskedMSELoss``,
``MaskedL1Loss``, ``FFTLoss``, ``PatchFFTLoss``, ``HOGTarget``, ``LowPassTarget``, ``GRN`` (``fastmim.ops.modules``).
"""

from fastmim.ops._dispatch import set_backend, set_compiled_ops
from fastmim.ops.attention import attention
from fastmim.ops.bias_gelu import bias_gelu
from fastmim.ops.fft_loss import fft_loss
from fastmim.ops.grn import grn
from fastmim.ops.hog import hog_target
from fastmim.ops.layer_norm import add_layer_norm, layer_norm
from fastmim.ops.low_pass import low_pass_target
from fastmim.ops.masked_loss import masked_mse_loss, masked_mse_loss_patchified
from fastmim.ops.modules import GRN, FFTLoss, HOGTarget, LowPassTarget, MaskedL1Loss, MaskedMSELoss, PatchFFTLoss
from fastmim.ops.patch_fft_loss import patch_fft_loss
from fastmim.ops.patchify import patchify, unpatchify
from fastmim.ops.reference import (
    add_layer_norm_ref,
    attention_ref,
    bias_gelu_ref,
    fft_loss_ref,
    gather_visible_ref,
    grn_ref,
    hog_target_ref,
    layer_norm_ref,
    low_pass_target_ref,
    masked_mse_loss_patchified_ref,
    masked_mse_loss_ref,
    patch_fft_loss_ref,
    patch_stats_ref,
    patchify_ref,
    resized_crop_ref,
    scatter_masked_ref,
    sparse_dwconv_ref,
    unpatchify_ref,
)
from fastmim.ops.resized_crop import resized_crop
from fastmim.ops.sparse_conv import SparseLayout, sparse_dwconv
from fastmim.ops.tokens import gather_visible, scatter_masked

__all__ = [
    "FFTLoss",
    "GRN",
    "HOGTarget",
    "LowPassTarget",
    "MaskedL1Loss",
    "MaskedMSELoss",
    "PatchFFTLoss",
    "add_layer_norm",
    "add_layer_norm_ref",
    "layer_norm",
    "layer_norm_ref",
    "attention",
    "attention_ref",
    "bias_gelu",
    "bias_gelu_ref",
    "SparseLayout",
    "fft_loss",
    "fft_loss_ref",
    "gather_visible",
    "gather_visible_ref",
    "grn",
    "grn_ref",
    "hog_target",
    "hog_target_ref",
    "low_pass_target",
    "low_pass_target_ref",
    "masked_mse_loss",
    "masked_mse_loss_patchified",
    "masked_mse_loss_patchified_ref",
    "masked_mse_loss_ref",
    "patch_fft_loss",
    "patch_fft_loss_ref",
    "patch_stats_ref",
    "patchify",
    "patchify_ref",
    "resized_crop",
    "resized_crop_ref",
    "scatter_masked",
    "scatter_masked_ref",
    "set_backend",
    "set_compiled_ops",
    "sparse_dwconv",
    "sparse_dwconv_ref",
    "unpatchify",
    "unpatchify_ref",
]
