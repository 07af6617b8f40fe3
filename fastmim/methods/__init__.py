"""Recipes: each composes a Mask, an Encoder, a Target and a Head."""

from fastmim.methods.fcmae import FCMAE
from fastmim.methods.mae import MaskedAutoencoderViT

__all__ = ["FCMAE", "MaskedAutoencoderViT"]
