"""Recipes: each composes a Mask, an Encoder, a Target and a Head."""

from fastmim.methods.fcmae import FCMAE
from fastmim.methods.mae import MaskedAutoencoderViT
from fastmim.methods.pixmim import PixMIMViT

__all__ = ["FCMAE", "MaskedAutoencoderViT", "PixMIMViT"]
