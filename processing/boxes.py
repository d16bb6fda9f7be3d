"""Box validation, clipping, normalisation and X-VLM region patch masks.

Conventions:

* Input boxes are in pixel coordinates of the *original* image, in ``box_format`` ``"xywh"`` (official X-VLM and
  COCO/RefCOCO), ``"xyxy"`` or ``"cxcywh"``. Image sizes are always ``(height, width)``.
* The model sees the image squashed (aspect ratio not kept) to ``(H_in, W_in)``; boxes are scaled by
  ``(W_in / W, H_in / H)`` and the targets are normalised ``(cx, cy, w, h)`` w.r.t. the model input
  (``[0.5, 0.5, 1, 1]`` = the whole image), as the grounding / pre-training bbox heads predict.
* Region masks follow the official ``get_image_attns`` (``dataset/pretrain_dataset.py``) for any input size and grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "as_box_tensor",
    "validate_and_clip_box",
    "validate_and_clip_boxes",
    "scale_boxes_to_input",
    "normalize_boxes",
    "region_mask_from_box",
    "region_masks_from_boxes",
    "whole_image_region_masks",
    "grid_shape",
]


# Box format conversion. The same arithmetic as `modeling_xvlm.box_ops.box_convert`, kept here so that this module
# and the image processor only import sibling modules and can be copied flat next to a checkpoint as remote code
# (transformers copies `from .x import` siblings only, not `from ..box_ops`; see docs/hub.md).
BOX_FORMATS: tuple[str, ...] = ("xywh", "xyxy", "cxcywh")


def box_convert(boxes: torch.Tensor, in_fmt: str, out_fmt: str) -> torch.Tensor:
    """Convert ``(..., 4)`` boxes between ``"xywh"``, ``"xyxy"`` and ``"cxcywh"`` (as ``modeling_xvlm.box_ops``)."""
    for fmt, name in ((in_fmt, "in_fmt"), (out_fmt, "out_fmt")):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"`{name}` must be one of {BOX_FORMATS}, got {fmt!r}.")
    if boxes.shape[-1] != 4:
        raise ValueError(f"`boxes` must have a last dimension of size 4, got shape {tuple(boxes.shape)}.")
    if in_fmt == out_fmt:
        return boxes
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh" and out_fmt == "cxcywh":
        return torch.stack((a + c / 2, b + d / 2, c, d), dim=-1)
    if in_fmt == "cxcywh" and out_fmt == "xywh":
        return torch.stack((a - c / 2, b - d / 2, c, d), dim=-1)
    if in_fmt == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    if out_fmt == "xyxy":
        return torch.stack((a, b, c, d), dim=-1)
    if out_fmt == "xywh":
        return torch.stack((a, b, c - a, d - b), dim=-1)
    return torch.stack(((a + c) / 2, (b + d) / 2, c - a, d - b), dim=-1)


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def grid_shape(image_size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` of a model input ``image_size`` (int or (H, W)) with total stride ``patch_size``.

    Raises ``ValueError`` if a side is not a positive multiple of ``patch_size``.
    """
    h, w = _hw(image_size)
    if patch_size <= 0 or h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        raise ValueError(
            f"image size (height={h}, width={w}) must be positive multiples of patch_size={patch_size} to build "
            "region masks."
        )
    return h // patch_size, w // patch_size


def as_box_tensor(box: Any, name: str = "box") -> torch.Tensor:
    """Turn one box (sequence of 4 numbers, array or tensor of shape (4,)) into a float64 tensor of shape (4,)."""
    try:
        t = torch.as_tensor(np.asarray(box.detach().cpu() if isinstance(box, torch.Tensor) else box, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be 4 numbers, got {box!r} ({err})") from None
    if t.shape != (4,):
        raise ValueError(f"{name} must have exactly 4 coordinates, got shape {tuple(t.shape)}: {box!r}")
    return t


def validate_and_clip_box(
    box: Any, image_size: Sequence[int], box_format: str = "xywh", name: str = "box"
) -> torch.Tensor:
    """Validate one pixel box and clip it to the image.

    Args:
        box: 4 numbers in ``box_format``, pixel coordinates of an image of ``image_size`` = (height, width).
        image_size: (height, width) of the image the box refers to.
        box_format: ``"xywh"``, ``"xyxy"`` or ``"cxcywh"``.
        name: how to call the box in error messages (e.g. ``"boxes[0][2]"``).

    Returns:
        ``(4,)`` float64 tensor, the clipped box in ``xyxy`` pixels.

    Raises:
        ValueError: NaN/inf coordinates, negative width or height (x_max < x_min for ``xyxy``), or no area left
        after clipping to ``[0, W] x [0, H]``; the message names ``name``.
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    t = as_box_tensor(box, name)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has a NaN or infinite coordinate: {t.tolist()}")
    if box_format == "xyxy":
        bw, bh = t[2] - t[0], t[3] - t[1]
    else:
        bw, bh = t[2], t[3]
    if bw < 0 or bh < 0:
        raise ValueError(f"{name} has a negative width or height ({box_format} {t.tolist()})")
    h, w = _hw(image_size)
    xyxy = box_convert(t, box_format, "xyxy").clone()
    xyxy[0::2] = xyxy[0::2].clamp(0, w)
    xyxy[1::2] = xyxy[1::2].clamp(0, h)
    if not bool(xyxy[2] > xyxy[0]) or not bool(xyxy[3] > xyxy[1]):
        raise ValueError(
            f"{name} ({box_format} {t.tolist()}) has no area left after clipping to the image "
            f"(height={h}, width={w}): clipped xyxy {xyxy.tolist()}"
        )
    return xyxy


def validate_and_clip_boxes(
    boxes: Any, image_size: Sequence[int], box_format: str = "xywh", name: str = "boxes"
) -> torch.Tensor:
    """Vector version of :func:`validate_and_clip_box`: ``(N, 4)`` in, ``(N, 4)`` float64 ``xyxy`` out.

    Errors name the row as ``f"{name}[i]"``.
    """
    rows = list(boxes) if not isinstance(boxes, torch.Tensor) else list(boxes.unbind(0)) if boxes.ndim == 2 else None
    if rows is None:
        raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")
    if not rows:
        return torch.zeros(0, 4, dtype=torch.float64)
    return torch.stack(
        [validate_and_clip_box(b, image_size, box_format, f"{name}[{i}]") for i, b in enumerate(rows)]
    )


def scale_boxes_to_input(
    boxes_xyxy: torch.Tensor, original_size: Sequence[int], input_size: int | Sequence[int]
) -> torch.Tensor:
    """Scale ``(N, 4)`` ``xyxy`` pixel boxes of an image of ``original_size`` (H, W) to the squashed model input
    ``input_size`` (int or (H_in, W_in)). Returns ``(N, 4)`` float64 ``xyxy`` in model-input pixels."""
    h, w = _hw(original_size)
    hi, wi = _hw(input_size)
    scale = torch.tensor([wi / w, hi / h, wi / w, hi / h], dtype=torch.float64)
    return boxes_xyxy.to(torch.float64) * scale


def normalize_boxes(boxes_xyxy: torch.Tensor, input_size: int | Sequence[int]) -> torch.Tensor:
    """``(N, 4)`` ``xyxy`` model-input pixel boxes -> ``(N, 4)`` normalised ``cxcywh`` (divide by (W_in, H_in)).

    Same arithmetic as the official ``target_bbox = [(x + w/2)/res, (y + h/2)/res, w/res, h/res]``.
    """
    hi, wi = _hw(input_size)
    xywh = box_convert(boxes_xyxy.to(torch.float64), "xyxy", "xywh")
    x, y, bw, bh = xywh.unbind(-1)
    return torch.stack(((x + bw / 2) / wi, (y + bh / 2) / hi, bw / wi, bh / hi), dim=-1)


def region_mask_from_box(
    x: float, y: float, w: float, h: float, image_size: int | Sequence[int], patch_size: int
) -> list[int]:
    """Official ``get_image_attns`` for one ``xywh`` box in model-input pixels; returns a list of ``1 + P`` ints.

    ``x_min = min(floor(x / ps), cols - 1)``, ``x_max = max(x_min + 1, min(ceil((x + w) / ps), cols))`` (exclusive),
    same for y with rows; element 0 ([CLS]) is 1; the grid is row-major (``1 + cols * i + j`` for row i, column j).
    """
    rows, cols = grid_shape(image_size, patch_size)
    x_min = min(math.floor(x / patch_size), cols - 1)
    x_max = max(x_min + 1, min(math.ceil((x + w) / patch_size), cols))
    y_min = min(math.floor(y / patch_size), rows - 1)
    y_max = max(y_min + 1, min(math.ceil((y + h) / patch_size), rows))
    mask = [0] * (1 + rows * cols)
    mask[0] = 1
    for i in range(y_min, y_max):
        for j in range(x_min, x_max):
            mask[1 + cols * i + j] = 1
    return mask


def region_masks_from_boxes(
    boxes_xywh: torch.Tensor | Sequence[Sequence[float]], image_size: int | Sequence[int], patch_size: int
) -> torch.Tensor:
    """Region patch masks for ``(N, 4)`` ``xywh`` boxes in *model-input* pixels.

    Args:
        boxes_xywh: ``(N, 4)`` boxes (x, y, w, h) in pixels of the resized model input.
        image_size: model input size, int or (H_in, W_in); each side a multiple of ``patch_size``.
        patch_size: total stride of the vision encoder (32 for Swin-B).

    Returns:
        ``(N, 1 + P)`` long tensor, ``P = (H_in / patch_size) * (W_in / patch_size)``; 1 for [CLS] and in-box patches.
    """
    rows, cols = grid_shape(image_size, patch_size)
    t = torch.as_tensor(boxes_xywh, dtype=torch.float64).reshape(-1, 4)
    out = [region_mask_from_box(*(float(v) for v in row), image_size=(rows * patch_size, cols * patch_size),
                                patch_size=patch_size) for row in t]
    if not out:
        return torch.zeros(0, 1 + rows * cols, dtype=torch.long)
    return torch.tensor(out, dtype=torch.long)


def whole_image_region_masks(n: int, image_size: int | Sequence[int], patch_size: int) -> torch.Tensor:
    """``(n, 1 + P)`` all-ones masks (whole-image entries)."""
    rows, cols = grid_shape(image_size, patch_size)
    return torch.ones(n, 1 + rows * cols, dtype=torch.long)
