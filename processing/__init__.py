"""Pre-processing for X-VLM (installed as ``modeling_xvlm.processing``): image processors (PIL backend for the
official preprocessing, tensor backend), boxes and region masks, text cleaning, ``XVLMProcessor``.

This package imports only transformers, torch, PIL and numpy (it ships flat as remote code next to checkpoints);
``modeling_xvlm`` registers its classes with ``AutoImageProcessor`` / ``AutoProcessor``.
"""

from .boxes import (
    grid_shape,
    normalize_boxes,
    region_mask_from_box,
    region_masks_from_boxes,
    scale_boxes_to_input,
    validate_and_clip_box,
    validate_and_clip_boxes,
    whole_image_region_masks,
)
from .image_processing_xvlm import (
    XVLMImageProcessor,
    XVLMImageProcessorKwargs,
    XVLMImageProcessorPil,
    load_image_rgb,
    load_images_rgb,
)
from .processing_xvlm import CAPTION_PROMPT, XVLMProcessor, encode_texts
from .text import pre_caption, pre_question

__all__ = [
    "CAPTION_PROMPT",
    "XVLMImageProcessor",
    "XVLMImageProcessorPil",
    "XVLMImageProcessorKwargs",
    "XVLMProcessor",
    "encode_texts",
    "grid_shape",
    "load_image_rgb",
    "load_images_rgb",
    "normalize_boxes",
    "pre_caption",
    "pre_question",
    "region_mask_from_box",
    "region_masks_from_boxes",
    "scale_boxes_to_input",
    "validate_and_clip_box",
    "validate_and_clip_boxes",
    "whole_image_region_masks",
]
