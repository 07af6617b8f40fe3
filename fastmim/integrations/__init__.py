"""fastmim's ops inside other libraries' models, one call each (each library imported only when used):

- ``patch_hf_vit_mae(model=None)`` / ``unpatch_hf_vit_mae``: Hugging Face transformers' ``ViTMAEForPreTraining``.
- ``fastmim.integrations.lightly``: lightly's MAE helpers (``get_at_index``, ``decode_masked``, ``mae_loss``) and
  ``patch_lightly()``.
- timm: ``fastmim.create_model("mae" | "fcmae", encoder=<timm model>)``; ``fastmim.integrations.timm.fuse_timm_vit
  (model)`` / ``unfuse_timm_vit``: a timm ViT's blocks (norms, attention, bias + GELU) on fastmim's fused ops.
"""

from __future__ import annotations

from fastmim.integrations.hf import is_patched as hf_vit_mae_is_patched
from fastmim.integrations.hf import patch_hf_vit_mae, unpatch_hf_vit_mae

__all__ = ["hf_vit_mae_is_patched", "patch_hf_vit_mae", "unpatch_hf_vit_mae"]
