"""RDED's synthesis recipe as data: the constants of RDED.md section 2 named in one place.

The crop sampler is torchvision's RandomResizedCrop with scale (0.08, 1) and square crops; the reference's
ImageNet settings are 10 images per class, 4 crops stitched per image (factor 2), 300 candidate images per
class with 5 crops each. (The student recipe lives in rded_fast/train/recipe.py.)
"""

from __future__ import annotations

CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop area fraction
CROP_RATIO = (1.0, 1.0)  # square crops: the reference's ratio=(1, 1)
IPC = 10
FACTOR = 2
MIPC = 300
NUM_CROP = 5
INPUT_SIZE = 224
CONTACT_SHEET_CLASSES = 20  # rows of the contact sheet, for people to look at

__all__ = ["CONTACT_SHEET_CLASSES", "CROP_RATIO", "CROP_SCALE", "FACTOR", "INPUT_SIZE", "IPC", "MIPC", "NUM_CROP"]
