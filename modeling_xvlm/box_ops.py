"""Box utilities for X-VLM (torch only, no other dependency: this file is also shipped as remote code).

Formats (all on the last dimension of size 4):

* ``"xywh"``   — (x_min, y_min, width, height): the official X-VLM and COCO/RefCOCO format.
* ``"xyxy"``   — (x_min, y_min, x_max, y_max).
* ``"cxcywh"`` — (center_x, center_y, width, height): what the X-VLM bbox head predicts (after a sigmoid,
  normalised to the square model input).

The IoU helpers follow DETR's conventions (the official X-VLM ``models/box_ops.py`` is DETR's), except for
``elementwise_generalized_box_iou``, which adds a small ``eps`` to the denominators so that degenerate or zero-area
boxes never produce NaN (see its docstring). ``inclusive_pixel_iou`` reproduces the official evaluation metric
``computeIoU`` of ``Grounding_bbox.py`` (inclusive-pixel convention).
"""

from __future__ import annotations

import torch

__all__ = [
    "BOX_FORMATS",
    "box_convert",
    "box_area",
    "pairwise_box_iou",
    "generalized_box_iou",
    "elementwise_generalized_box_iou",
    "inclusive_pixel_iou",
]

BOX_FORMATS: tuple[str, ...] = ("xywh", "xyxy", "cxcywh")


def _check_format(fmt: str, name: str) -> None:
    if fmt not in BOX_FORMATS:
        raise ValueError(f"`{name}` must be one of {BOX_FORMATS}, got {fmt!r}.")


def _check_last_dim(boxes: torch.Tensor, name: str) -> None:
    if boxes.shape[-1] != 4:
        raise ValueError(f"`{name}` must have a last dimension of size 4, got shape {tuple(boxes.shape)}.")


def _to_xyxy(boxes: torch.Tensor, fmt: str) -> torch.Tensor:
    a, b, c, d = boxes.unbind(-1)
    if fmt == "xyxy":
        return boxes
    if fmt == "xywh":
        return torch.stack((a, b, a + c, b + d), dim=-1)
    # cxcywh
    return torch.stack((a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d), dim=-1)


def _from_xyxy(boxes: torch.Tensor, fmt: str) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    if fmt == "xyxy":
        return boxes
    if fmt == "xywh":
        return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)
    # cxcywh
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_convert(boxes: torch.Tensor, in_fmt: str, out_fmt: str) -> torch.Tensor:
    """Convert boxes between ``"xywh"``, ``"xyxy"`` and ``"cxcywh"``.

    Args:
        boxes: tensor of shape ``(..., 4)`` (any leading shape, floating point recommended).
        in_fmt: format of ``boxes``.
        out_fmt: wanted format.

    Returns:
        Tensor of shape ``(..., 4)`` in ``out_fmt`` (a new tensor unless the formats are equal, in which case the
        input is returned unchanged).
    """
    _check_format(in_fmt, "in_fmt")
    _check_format(out_fmt, "out_fmt")
    _check_last_dim(boxes, "boxes")
    if in_fmt == out_fmt:
        return boxes
    if in_fmt == "xywh" and out_fmt == "cxcywh":
        x, y, w, h = boxes.unbind(-1)
        return torch.stack((x + w / 2, y + h / 2, w, h), dim=-1)
    if in_fmt == "cxcywh" and out_fmt == "xywh":
        cx, cy, w, h = boxes.unbind(-1)
        return torch.stack((cx - w / 2, cy - h / 2, w, h), dim=-1)
    return _from_xyxy(_to_xyxy(boxes, in_fmt), out_fmt)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``xyxy`` boxes.

    Args:
        boxes: ``(..., 4)`` in ``xyxy``.

    Returns:
        ``(...)``: ``(x1 - x0) * (y1 - y0)`` (negative sizes are *not* clamped, as in DETR/torchvision).
    """
    _check_last_dim(boxes, "boxes")
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_iou_and_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def pairwise_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU between every pair of ``xyxy`` boxes (DETR's ``box_iou``, continuous coordinates).

    Args:
        boxes1: ``(N, 4)`` in ``xyxy``.
        boxes2: ``(M, 4)`` in ``xyxy``.

    Returns:
        ``(N, M)`` IoU. Two zero-area boxes give NaN (0/0), as in DETR; use
        :func:`elementwise_generalized_box_iou` for a NaN-free loss.
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    iou, _ = _pairwise_iou_and_union(boxes1, boxes2)
    return iou


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalized IoU (https://giou.stanford.edu/) between every pair of ``xyxy`` boxes (DETR's version).

    Args:
        boxes1: ``(N, 4)`` in ``xyxy``.
        boxes2: ``(M, 4)`` in ``xyxy``.

    Returns:
        ``(N, M)`` GIoU in ``[-1, 1]``. Degenerate boxes (x1 < x0 or y1 < y0) raise a ``ValueError``, as the DETR
        asserts do; zero-area boxes may give NaN.
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    if not bool((boxes1[:, 2:] >= boxes1[:, :2]).all()):
        raise ValueError("`boxes1` contains degenerate boxes (x1 < x0 or y1 < y0).")
    if not bool((boxes2[:, 2:] >= boxes2[:, :2]).all()):
        raise ValueError("`boxes2` contains degenerate boxes (x1 < x0 or y1 < y0).")
    iou, union = _pairwise_iou_and_union(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def elementwise_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU of matching rows: ``out[i] = GIoU(boxes1[i], boxes2[i])`` for ``xyxy`` boxes; never NaN.

    Equal to ``generalized_box_iou(boxes1, boxes2).diag()`` for well-formed boxes with positive area, but without the
    ``N x M`` matrix. Robustness choices:

    * widths/heights of the boxes themselves are clamped at 0, so a degenerate box (x1 < x0) has zero area instead of
      a negative one;
    * ``eps`` is added to the union and the enclosing-box area (the two denominators), so two zero-area boxes give
      a finite value (0 for IoU and 0 for the enclosing term when both collapse to the same point) and gradients
      stay finite.

    The official code instead zeroes the GIoU loss for the whole batch when any box is degenerate (official
    `models/xvlm.py`, `get_bbox_loss`); callers wanting that behaviour can check degeneracy themselves.

    Args:
        boxes1: ``(N, 4)`` in ``xyxy`` (any leading shape ``(..., 4)`` works as well).
        boxes2: same shape as ``boxes1``.
        eps: added to denominators.

    Returns:
        ``(N,)`` (or ``(...)``) GIoU in ``[-1, 1]``.
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"`boxes1` and `boxes2` must have the same shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}."
        )
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (boxes1[..., 3] - boxes1[..., 1]).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (boxes2[..., 3] - boxes2[..., 1]).clamp(min=0)
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / (union + eps)
    lt_c = torch.min(boxes1[..., :2], boxes2[..., :2])
    rb_c = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    enclosing = wh_c[..., 0] * wh_c[..., 1]
    return iou - (enclosing - union) / (enclosing + eps)


def inclusive_pixel_iou(gt_xywh: torch.Tensor, pred_xywh: torch.Tensor) -> torch.Tensor:
    """The official grounding metric ``computeIoU`` (``Grounding_bbox.py``), applied to matching rows.

    Inclusive-pixel convention: a box (x, y, w, h) covers pixels x .. x + w - 1. The intersection is
    ``[max(x1), min(x1 + w1 - 1, x2 + w2 - 1)]`` (same for y); it counts only if ``ix1 < ix2`` and ``iy1 < iy2``
    (strict, as in the official code), with area ``(ix2 - ix1 + 1) * (iy2 - iy1 + 1)``. The union is
    ``w1*h1 + w2*h2 - inter`` (the areas themselves are *not* inclusive, exactly as in the official code).

    Args:
        gt_xywh: ``(N, 4)`` ground-truth boxes in pixel ``xywh`` (any leading shape ``(..., 4)``).
        pred_xywh: same shape, predicted boxes in pixel ``xywh``.

    Returns:
        ``(N,)`` float IoU (a prediction is counted correct in the official evaluation when IoU >= 0.5). A zero union
        gives 0.
    """
    _check_last_dim(gt_xywh, "gt_xywh")
    _check_last_dim(pred_xywh, "pred_xywh")
    if gt_xywh.shape != pred_xywh.shape:
        raise ValueError(
            f"`gt_xywh` and `pred_xywh` must have the same shape, got {tuple(gt_xywh.shape)} and "
            f"{tuple(pred_xywh.shape)}."
        )
    gt = gt_xywh if gt_xywh.is_floating_point() else gt_xywh.float()
    pred = pred_xywh.to(gt.dtype)
    ix1 = torch.max(gt[..., 0], pred[..., 0])
    iy1 = torch.max(gt[..., 1], pred[..., 1])
    ix2 = torch.min(gt[..., 0] + gt[..., 2] - 1, pred[..., 0] + pred[..., 2] - 1)
    iy2 = torch.min(gt[..., 1] + gt[..., 3] - 1, pred[..., 1] + pred[..., 3] - 1)
    has_inter = (ix1 < ix2) & (iy1 < iy2)
    inter = torch.where(has_inter, (ix2 - ix1 + 1) * (iy2 - iy1 + 1), torch.zeros_like(ix1))
    union = gt[..., 2] * gt[..., 3] + pred[..., 2] * pred[..., 3] - inter
    safe_union = torch.where(union == 0, torch.ones_like(union), union)
    return torch.where(union == 0, torch.zeros_like(union), inter / safe_union)
