"""Pre-processing for X-VLM (installed as ``modeling_xvlm.processing``).

Importing this package registers the X-VLM image processors with ``AutoImageProcessor`` and ``XVLMProcessor`` with
``AutoProcessor`` (keyed on ``XVLMConfig``), and makes the PIL backend the default ``AutoImageProcessor`` backend for
X-VLM (it reproduces the official preprocessing exactly).
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
from .masking import XVLMTextMasker, mask_token_ids
from .processing_xvlm import XVLMProcessor, encode_texts
from .text import pre_caption, pre_question
from .collator import (
    XVLMGroundingCollator,
    XVLMPretrainCollator,
    XVLMRegionSampler,
    mentions_left_right,
)


def register_auto_classes() -> bool:
    """Register with ``AutoImageProcessor`` / ``AutoProcessor``; returns False if ``XVLMConfig`` is not importable."""
    try:
        from ..configuration_xvlm import XVLMConfig
    except ImportError:
        return False
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.models.auto import image_processing_auto

    AutoImageProcessor.register(
        XVLMConfig,
        image_processor_classes={"pil": XVLMImageProcessorPil, "torchvision": XVLMImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(XVLMConfig, XVLMProcessor, exist_ok=True)
    # PIL is the parity backend: make it the default even when torchvision is installed.
    defaults = image_processing_auto.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS
    if "XVLMImageProcessor" not in defaults:
        defaults.append("XVLMImageProcessor")
    return True


register_auto_classes()

__all__ = [
    "XVLMImageProcessor",
    "XVLMImageProcessorPil",
    "XVLMImageProcessorKwargs",
    "XVLMProcessor",
    "XVLMTextMasker",
    "XVLMPretrainCollator",
    "XVLMGroundingCollator",
    "XVLMRegionSampler",
    "encode_texts",
    "grid_shape",
    "load_image_rgb",
    "load_images_rgb",
    "mask_token_ids",
    "mentions_left_right",
    "normalize_boxes",
    "pre_caption",
    "pre_question",
    "region_mask_from_box",
    "region_masks_from_boxes",
    "register_auto_classes",
    "scale_boxes_to_input",
    "validate_and_clip_box",
    "validate_and_clip_boxes",
    "whole_image_region_masks",
]
