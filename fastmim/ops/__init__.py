"""fastmim.ops: masked-modeling ops. Each has a plain PyTorch reference (``*_ref``) that defines its semantics."""

from fastmim.ops.reference import masked_mse_loss_ref, patch_stats_ref, patchify_ref, unpatchify_ref

__all__ = ["masked_mse_loss_ref", "patch_stats_ref", "patchify_ref", "unpatchify_ref"]
