"""Target module: what a masked model predicts (pixels, norm-pix, low-frequency pixels, HOG features; later
teacher features)."""

from fastmim.targets.hog import HOGTarget
from fastmim.targets.low_pass import LowPassTarget, low_pass_images
from fastmim.targets.pixel import PixelTarget

__all__ = ["HOGTarget", "LowPassTarget", "PixelTarget", "low_pass_images"]
