"""Target module: what a masked model predicts (pixels, norm-pix, low-frequency pixels, HOG features, an EMA
teacher's features) and the losses it is compared with (frequency losses)."""

from fastmim.targets.frequency import FrequencyLoss
from fastmim.targets.hog import HOGTarget
from fastmim.targets.low_pass import low_pass_images
from fastmim.targets.pixel import PixelTarget
from fastmim.targets.teacher import EMATeacher

__all__ = ["EMATeacher", "FrequencyLoss", "HOGTarget", "PixelTarget", "low_pass_images"]
