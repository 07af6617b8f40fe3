"""Encoders and the model registry."""

from fastmim.models.registry import create_model, list_models, register_model
from fastmim.models.vit import Block, PatchEmbed, VisionTransformer, vit_sizes

__all__ = ["Block", "PatchEmbed", "VisionTransformer", "create_model", "list_models", "register_model", "vit_sizes"]
