"""Recipes: each composes a Mask, an Encoder, a Target and a Head."""

from fastmim.methods.fcmae import FCMAE
from fastmim.methods.mae import MaskedAutoencoderViT
from fastmim.methods.maskfeat import MaskFeatViT
from fastmim.methods.pixmim import PixMIMViT
from fastmim.methods.simmim import SimMIMViT

__all__ = ["FCMAE", "MaskFeatViT", "MaskedAutoencoderViT", "PixMIMViT", "SimMIMViT"]
