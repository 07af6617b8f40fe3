"""Target module: what a masked model predicts (pixels, norm-pix; later HOG, Fourier, teacher features)."""

from fastmim.targets.pixel import PixelTarget

__all__ = ["PixelTarget"]
