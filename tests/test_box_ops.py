"""Tests for modeling_xvlm.box_ops (box formats, areas, IoU/GIoU, the official inclusive-pixel IoU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from modeling_xvlm.box_ops import (
    BOX_FORMATS,
    box_area,
    box_convert,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    inclusive_pixel_iou,
    pairwise_box_iou,
)

XYWH = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 1.0, 2.0], [5.5, 6.25, 0.0, 3.0]], dtype=torch.float64)
XYXY = torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 1.0, 2.0], [5.5, 6.25, 5.5, 9.25]], dtype=torch.float64)
CXCYWH = torch.tensor([[25.0, 40.0, 30.0, 40.0], [0.5, 1.0, 1.0, 2.0], [5.5, 7.75, 0.0, 3.0]], dtype=torch.float64)
BY_FMT = {"xywh": XYWH, "xyxy": XYXY, "cxcywh": CXCYWH}


@pytest.mark.parametrize("in_fmt,out_fmt", list(itertools.product(BOX_FORMATS, BOX_FORMATS)))
def test_box_convert_known_values_and_round_trip(in_fmt: str, out_fmt: str) -> None:
    out = box_convert(BY_FMT[in_fmt], in_fmt, out_fmt)
    assert torch.equal(out, BY_FMT[out_fmt])
    assert torch.equal(box_convert(out, out_fmt, in_fmt), BY_FMT[in_fmt])


def test_box_convert_leading_dims_and_errors() -> None:
    boxes = torch.rand(2, 3, 5, 4)
    assert box_convert(boxes, "xywh", "cxcywh").shape == (2, 3, 5, 4)
    with pytest.raises(ValueError, match="in_fmt"):
        box_convert(boxes, "yxyx", "xyxy")
    with pytest.raises(ValueError, match="out_fmt"):
        box_convert(boxes, "xyxy", "ltrb")
    with pytest.raises(ValueError, match="size 4"):
        box_convert(torch.zeros(3, 5), "xyxy", "xywh")


def test_box_area() -> None:
    assert torch.equal(box_area(XYXY), torch.tensor([1200.0, 2.0, 0.0], dtype=torch.float64))


def test_pairwise_iou_and_giou_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 4.0, 5.0, 5.0]])
    iou = pairwise_box_iou(a, b)
    assert iou.shape == (2, 3)
    expected_iou = torch.tensor([[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]])
    torch.testing.assert_close(iou, expected_iou)
    giou = generalized_box_iou(a, b)
    # a0 vs b0: enclosing 9, union 7 -> 1/7 - 2/9 ; a1 vs b2: enclosing 25, union 2 -> 0 - 23/25
    torch.testing.assert_close(giou[0, 0], torch.tensor(1 / 7 - 2 / 9))
    torch.testing.assert_close(giou[1, 2], torch.tensor(-23 / 25))
    torch.testing.assert_close(giou[0, 1], torch.tensor(1.0))
    with pytest.raises(ValueError, match="degenerate"):
        generalized_box_iou(torch.tensor([[2.0, 0.0, 1.0, 1.0]]), b)


def test_elementwise_giou_matches_diagonal_and_never_nan() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g)
    wh = torch.rand(20, 2, generator=g) + 0.05
    a = torch.cat([xy, xy + wh], -1)
    xy2 = torch.rand(20, 2, generator=g)
    b = torch.cat([xy2, xy2 + torch.rand(20, 2, generator=g) + 0.05], -1)
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b), generalized_box_iou(a, b).diag(), atol=1e-5, rtol=0)
    # degenerate / zero-area inputs stay finite, gradients too
    bad = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.3, 0.3, 0.3, 0.9], [0.6, 0.6, 0.2, 0.2]], requires_grad=True)
    same = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.3, 0.3, 0.3, 0.9], [0.0, 0.0, 1.0, 1.0]])
    out = elementwise_generalized_box_iou(bad, same)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(bad.grad).all()
    assert out.shape == (3,)
    with pytest.raises(ValueError, match="same shape"):
        elementwise_generalized_box_iou(a, b[:3])


def test_inclusive_pixel_iou_official_compute_iou() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]])
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 10.0, 10.0], [9.0, 0.0, 5.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    iou = inclusive_pixel_iou(gt, pred)
    # identical: inter = (9-0+1)^2 = 100, union = 100 + 100 - 100
    # shifted: inter x [5, 9] -> 5*5 = 25, union 175
    # touching column: ix1 = 9, ix2 = 9 -> not strictly less -> no intersection
    # zero-size prediction: ix2 = -1 < ix1 -> no intersection, union 16
    torch.testing.assert_close(iou, torch.tensor([1.0, 25 / 175, 0.0, 0.0]))
    assert inclusive_pixel_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0
