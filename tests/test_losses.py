"""Loss functions on hand-made inputs (modeling_xvlm/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_xvlm.losses import (
    IGNORE_INDEX,
    bbox_losses,
    gather_with_grad,
    image_text_contrastive_loss,
    image_text_matching_loss,
    masked_lm_loss,
    sample_hard_negatives,
)


def _feats(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, dim, generator=g), dim=-1),
        F.normalize(torch.randn(n, dim, generator=g), dim=-1),
    )


# -- ITC ------------------------------------------------------------------------------------------------------------


def test_itc_without_ids_is_symmetric_cross_entropy():
    img, txt = _feats(5)
    logits = img @ txt.t() / 0.07
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(image_text_contrastive_loss(img, txt, 0.07), expected)
    # Unique ids give one-hot targets: the same loss.
    assert torch.allclose(image_text_contrastive_loss(img, txt, 0.07, torch.tensor([4, 3, 2, 1, 0])), expected)


def test_itc_soft_targets_with_repeated_image_ids():
    img, txt = _feats(4, seed=1)
    ids = torch.tensor([7, 7, 3, 7])
    logits = img @ txt.t() / 0.1
    # Hand-written targets: rows 0, 1, 3 share id 7 -> 1/3 each on columns 0, 1, 3; row 2 is one-hot.
    targets = torch.tensor(
        [[1 / 3, 1 / 3, 0, 1 / 3], [1 / 3, 1 / 3, 0, 1 / 3], [0, 0, 1.0, 0], [1 / 3, 1 / 3, 0, 1 / 3]]
    )
    i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    t2i = -(targets * logits.t().log_softmax(1)).sum(1).mean()
    loss = image_text_contrastive_loss(img, txt, 0.1, ids)
    assert torch.allclose(loss, (i2t + t2i) / 2)
    assert not torch.allclose(loss, image_text_contrastive_loss(img, txt, 0.1))


def test_itc_rejects_unaligned_pairs():
    img, txt = _feats(3)
    with pytest.raises(ValueError, match="aligned"):
        image_text_contrastive_loss(img, txt[:2], 0.07)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


# -- ITM negatives --------------------------------------------------------------------------------------------------


def test_hard_negatives_never_pick_a_positive():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positives = ids[:, None] == ids[None, :]
    # Positives get by far the largest similarity: without masking they would nearly always be drawn.
    sim = torch.randn(8, 8) + 50.0 * positives.float()
    for _ in range(50):
        neg_img, neg_txt, t_ok, i_ok = sample_hard_negatives(sim, positives)
        assert t_ok.all() and i_ok.all()
        assert not positives[neg_img, torch.arange(8)].any()  # (negative image, text b)
        assert not positives[torch.arange(8), neg_txt].any()  # (image b, negative text)


def test_hard_negatives_follow_the_similarity():
    torch.manual_seed(0)
    sim = torch.zeros(3, 3)
    sim[0, 2] = 10.0  # image 0's hardest negative text is 2; text 2's hardest negative image is 0
    counts_t = torch.zeros(3)
    counts_i = torch.zeros(3)
    for _ in range(200):
        neg_img, neg_txt, _, _ = sample_hard_negatives(sim)
        counts_t[neg_txt[0]] += 1
        counts_i[neg_img[2]] += 1
    assert counts_t[2] > 190 and counts_t[0] == 0
    assert counts_i[0] > 190 and counts_i[2] == 0


def test_hard_negatives_rows_without_candidates_are_flagged():
    neg_img, neg_txt, t_ok, i_ok = sample_hard_negatives(torch.zeros(1, 1))
    assert not t_ok.any() and not i_ok.any()
    ids = torch.tensor([5, 5, 6])
    _, _, t_ok, i_ok = sample_hard_negatives(torch.zeros(3, 3), ids[:, None] == ids[None, :])
    assert t_ok.tolist() == [True, True, True] and i_ok.tolist() == [True, True, True]
    ids = torch.tensor([5, 5])
    _, _, t_ok, i_ok = sample_hard_negatives(torch.zeros(2, 2), ids[:, None] == ids[None, :])
    assert not t_ok.any() and not i_ok.any()


def test_itm_loss_labels_and_ignored_rows():
    logits = torch.randn(6, 2)
    loss, labels = image_text_matching_loss(logits, torch.tensor([True, False]), torch.tensor([True, True]))
    assert labels.tolist() == [1, 1, 0, IGNORE_INDEX, 0, 0]
    keep = torch.tensor([0, 1, 2, 4, 5])
    assert torch.allclose(loss, F.cross_entropy(logits[keep], labels[keep]))


# -- MLM ------------------------------------------------------------------------------------------------------------


def test_mlm_loss_ignores_minus_100():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[1, 3], labels[1, 4] = 3, 7, 0
    loss = masked_lm_loss(logits, labels)
    manual = -(
        logits[0, 1].log_softmax(-1)[3] + logits[1, 3].log_softmax(-1)[7] + logits[1, 4].log_softmax(-1)[0]
    ) / 3
    assert torch.allclose(loss, manual)
    loss.backward()
    ignored = labels == IGNORE_INDEX
    assert logits.grad[ignored].abs().sum() == 0 and logits.grad[~ignored].abs().sum() > 0
    # Changing logits at ignored positions changes nothing.
    other = logits.detach().clone()
    other[ignored] = torch.randn_like(other[ignored]) * 100
    assert torch.allclose(masked_lm_loss(other, labels), loss)


def test_mlm_loss_without_labels_is_zero():
    logits = torch.randn(3, 11, requires_grad=True)
    loss = masked_lm_loss(logits, torch.full((3,), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# -- boxes ----------------------------------------------------------------------------------------------------------


def test_bbox_losses_hand_computed():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]])
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.7, 0.7, 0.2, 0.2]])
    l1, giou = bbox_losses(pred, target)
    # Box 0: nested, IoU = 0.04 / 0.16, enclosing = target -> GIoU 0.25. L1 = 0.2 + 0.2.
    # Box 1: disjoint, union 0.08, enclosing 0.7 * 0.7 -> GIoU = -(0.49 - 0.08) / 0.49. L1 = 0.5 + 0.5 (centres only).
    giou_1 = -(0.49 - 0.08) / 0.49
    assert math.isclose(l1.item(), (0.4 + 1.0) / 2, rel_tol=1e-5)
    assert math.isclose(giou.item(), ((1 - 0.25) + (1 - giou_1)) / 2, rel_tol=1e-5)


def test_bbox_losses_exclude_whole_image_entries():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2]])
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0], [0.7, 0.7, 0.2, 0.2]])
    l1, giou = bbox_losses(pred, target, is_image=torch.tensor([0, 1, 0]))
    l1_ref, giou_ref = bbox_losses(pred[[0, 2]], target[[0, 2]])
    assert torch.allclose(l1, l1_ref) and torch.allclose(giou, giou_ref)


def test_bbox_losses_all_whole_image_give_zero_not_nan():
    pred = torch.rand(3, 4, requires_grad=True)
    l1, giou = bbox_losses(pred, torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 3), is_image=torch.ones(3))
    assert l1.item() == 0.0 and giou.item() == 0.0
    (l1 + giou).backward()
    assert torch.isfinite(pred.grad).all()


def test_bbox_degenerate_box_is_masked_per_box_and_official_zeroes_batch():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, -0.1, 0.3]])  # second target has negative width
    l1, giou = bbox_losses(pred, target)
    assert torch.isfinite(l1) and torch.isfinite(giou)
    # Only box 0 contributes a GIoU term (0.75), still divided by the 2 boxes; L1 keeps both.
    assert math.isclose(giou.item(), 0.75 / 2, rel_tol=1e-5)
    assert math.isclose(l1.item(), (0.4 + (0.3 + 0.1)) / 2, rel_tol=1e-5)
    (l1 + giou).backward()
    assert torch.isfinite(pred.grad).all()
    _, giou_official = bbox_losses(pred, target, official_batch_zeroing=True)
    assert giou_official.item() == 0.0


def test_bbox_zero_area_boxes_are_finite():
    pred = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.0, 0.2]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.6, 0.6, 0.2, 0.0]])
    l1, giou = bbox_losses(pred, target)
    assert torch.isfinite(l1) and torch.isfinite(giou)
    (l1 + giou).backward()
    assert torch.isfinite(pred.grad).all()


def test_bbox_losses_mask_excluded_rows_before_computing():
    pred = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2], [0.6, 0.4, 0.3, 0.5]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.5, 0.5], [float("nan")] * 4, [0.6, 0.5, 0.3, 0.4]])
    l1, giou = bbox_losses(pred, target, is_image=torch.tensor([0, 1, 0]))
    l1_ref, giou_ref = bbox_losses(pred[[0, 2]].detach(), target[[0, 2]])
    torch.testing.assert_close(l1, l1_ref)
    torch.testing.assert_close(giou, giou_ref)
    (l1 + giou).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[1].abs().sum() == 0


def test_bbox_losses_is_image_must_be_binary():
    pred = torch.tensor([[0.5, 0.5, 0.4, 0.4]] * 2)
    with pytest.raises(ValueError, match="is_image must hold 0"):
        bbox_losses(pred, pred.clone(), is_image=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 entries for 2 boxes|1 entries for 2 boxes"):
        bbox_losses(pred, pred.clone(), is_image=torch.tensor([1]))
