"""Target module: what a masked model predicts (pixels, norm-pix; later HOG, Fourier, teacher features)."""

from fastmim.targets.low_pass import LowPassTarget, low_pass_images
from fastmim.targets.pixel import PixelTarget

__all__ = ["LowPassTarget", "PixelTarget", "low_pass_images"]
