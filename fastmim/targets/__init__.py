"""Target module: what a masked model predicts (pixels, norm-pix, low-frequency pixels, HOG features; later
teacher features)."""

from fastmim.targets.hog import HOGTarget
from fastmim.targets.low_pass import LowPassTarget, low_pass_images
from fastmim.targets.pixel import PixelTarget
from fastmim.targets.teacher import EMATeacher

__all__ = ["EMATeacher", "HOGTarget", "LowPassTarget", "PixelTarget", "low_pass_images"]
