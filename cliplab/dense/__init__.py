"""Dense prediction from CLIP: segmentation data, metrics, patch-text similarity maps, and the seed papers' dense
methods (DenseCLIP, MAFT+, ExCEL, CLOC, READ's similarity-as-points) on top of them.

* :mod:`.data`: segmentation samples (image + per-pixel class labels) from the synthetic world's object masks, or
  from a folder of image + mask PNG pairs;
* :mod:`.metrics`: confusion-matrix mIoU and pixel accuracy;
* :mod:`.maps`: patch-text similarity maps (naive, MaskCLIP, SCLIP), upsampled to the image;
* :mod:`.segment`: training-free segmentation from those maps, its evaluation, mask and overlay pictures.
"""

from .data import BACKGROUND, FolderSegmentation, SegmentationSample, SyntheticSegmentation
from .metrics import SegmentationMeter, confusion_matrix, segmentation_scores
from .maps import METHODS, correlative_attention, patch_features, rerun_last_block, similarity_maps, upsample_maps
from .segment import (SegmentationResult, evaluate_segmentation, label_features, mask_image, overlay_image,
                      save_segmentation, segment)

__all__ = ["BACKGROUND", "FolderSegmentation", "SegmentationSample", "SyntheticSegmentation", "SegmentationMeter",
           "confusion_matrix", "segmentation_scores",
           "METHODS", "correlative_attention", "patch_features", "rerun_last_block", "similarity_maps", "upsample_maps",
           "SegmentationResult", "evaluate_segmentation", "label_features", "mask_image", "overlay_image",
           "save_segmentation", "segment"]
