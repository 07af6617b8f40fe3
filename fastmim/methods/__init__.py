"""Recipes: each composes a Mask, an Encoder, a Target and a Head."""

from fastmim.methods.a2mim import A2MIMViT
from fastmim.methods.data2vec2 import Data2Vec2ViT
from fastmim.methods.fcmae import FCMAE
from fastmim.methods.from_timm import TimmMAE
from fastmim.methods.ijepa import IJEPAViT
from fastmim.methods.mae import MaskedAutoencoderViT
from fastmim.methods.maskfeat import MaskFeatViT
from fastmim.methods.pixmim import PixMIMViT
from fastmim.methods.simmim import SimMIMViT

__all__ = [
    "A2MIMViT",
    "Data2Vec2ViT",
    "FCMAE",
    "IJEPAViT",
    "MaskFeatViT",
    "MaskedAutoencoderViT",
    "PixMIMViT",
    "SimMIMViT",
    "TimmMAE",
]
