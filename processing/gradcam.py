"""Box choice of weakly supervised grounding from Grad-CAM maps (official ``dataset/utils.py::grounding_eval``).

A pair's ``(grid_h, grid_w)`` map (``XVLMForRetrieval.compute_gradcam``) is up-sampled bicubically to the original
image size (``F.interpolate(..., mode="bicubic")``, ``align_corners=False``, values can dip below 0); each
candidate box ``(x, y, w, h)`` in pixels scores ``up[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** 0.5``
(the full area even when the box crosses the image border); the box with the highest score is chosen. Torch and
sibling modules only, so that this file travels with the processor as remote code (docs/hub.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["candidate_box_problems", "post_process_gradcam"]


def candidate_box_problems(box: Any, what: str = "candidate box") -> list[str]:
    """Why ``box`` is no usable candidate ``[x, y, w, h]`` (empty when it is): four finite numbers, ``x, y >= 0``
    (the official slice ``up[int(y):...]`` would wrap around with a negative start) and ``w, h > 0``. A box may
    extend past the image: the official score keeps its full area."""
    if isinstance(box, torch.Tensor):
        box = box.tolist()
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        return [f"{what} must be [x, y, w, h], got {box!r}"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return [f"{what} must hold four finite numbers, got {list(box)!r}"]
    x, y, w, h = box
    problems = []
    if x < 0 or y < 0:
        problems.append(f"{what} {list(box)} starts at a negative coordinate")
    if w <= 0 or h <= 0:
        problems.append(f"{what} {list(box)} has a non-positive size")
    return problems


def _sizes(target_sizes: Any, n: int) -> list[tuple[int, int]]:
    if isinstance(target_sizes, torch.Tensor):
        target_sizes = target_sizes.tolist()
    if isinstance(target_sizes, (str, bytes)) or not isinstance(target_sizes, Sequence) or len(target_sizes) != n:
        raise ValueError(f"target_sizes must give one (height, width) per map ({n}), got {target_sizes!r}.")
    sizes = []
    for size in target_sizes:
        if (
            not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == int(v) and v > 0 for v in size)
        ):
            raise ValueError(f"each target size must be (height, width) in positive whole pixels, got {size!r}.")
        sizes.append((int(size[0]), int(size[1])))
    return sizes


def post_process_gradcam(maps: Any, candidate_boxes: Any, target_sizes: Any) -> list[dict[str, Any]]:
    """Choose, for each (image, text) pair, the candidate box that its Grad-CAM map covers best.

    Args:
        maps: `(B, grid_h, grid_w)` tensor (or a list of `(grid_h, grid_w)` tensors) from `compute_gradcam`.
        candidate_boxes: per pair, a non-empty list (or `(N_b, 4)` tensor) of pixel `[x, y, w, h]` boxes of the
            original image (official `dets.json`).
        target_sizes: per pair, the original image's `(height, width)`.

    Returns:
        Per pair `{"scores": (N_b,) float32 tensor (every candidate, in order), "index": int (the chosen
        candidate: the first highest score), "box": (4,) float32 tensor, the chosen box in pixel x0, y0, x1, y1}`.
        The official loop keeps a box only when its score beats 0 (when none does, it silently reuses the previous
        pair's box); here the highest score is chosen in every case.
    """
    if isinstance(maps, torch.Tensor):
        if maps.dim() != 3:
            raise ValueError(f"maps must be (batch, grid_h, grid_w), got shape {tuple(maps.shape)}.")
        maps = list(maps)
    if not isinstance(maps, Sequence) or not all(isinstance(m, torch.Tensor) and m.dim() == 2 for m in maps):
        raise ValueError("maps must be a (batch, grid_h, grid_w) tensor or a list of (grid_h, grid_w) tensors.")
    n = len(maps)
    if isinstance(candidate_boxes, (str, bytes)) or not isinstance(candidate_boxes, (Sequence, torch.Tensor)) or (
        len(candidate_boxes) != n
    ):
        raise ValueError(f"candidate_boxes must give one list of boxes per map ({n}), got {candidate_boxes!r}.")
    sizes = _sizes(target_sizes, n)
    results = []
    for b, (cam, boxes, (height, width)) in enumerate(zip(maps, candidate_boxes, sizes)):
        boxes = boxes.tolist() if isinstance(boxes, torch.Tensor) else boxes
        if not isinstance(boxes, Sequence) or isinstance(boxes, (str, bytes)) or not boxes:
            raise ValueError(f"candidate_boxes[{b}] must be a non-empty list of [x, y, w, h] boxes, got {boxes!r}.")
        for k, box in enumerate(boxes):
            problems = candidate_box_problems(box, f"candidate_boxes[{b}][{k}]")
            if problems:
                raise ValueError("; ".join(problems) + ".")
        up = F.interpolate(cam.detach().float()[None, None], size=(height, width), mode="bicubic")[0, 0]
        # Python floats, as the official code reads the boxes from JSON, for the same int() truncations.
        boxes = [[float(v) for v in box] for box in boxes]
        scores = torch.stack(
            [up[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** 0.5 for x, y, w, h in boxes]
        )
        if not torch.isfinite(scores).all():
            raise ValueError(f"maps[{b}] gives non-finite box scores {scores.tolist()}.")
        index = int(torch.nonzero(scores == scores.max())[0, 0])
        x, y, w, h = boxes[index]
        results.append({"scores": scores, "index": index, "box": torch.tensor([x, y, x + w, y + h])})
    return results
