"""X-VLM training objectives (official `models/xvlm.py`: `get_contrastive_loss`, `get_matching_loss`,
`get_mlm_loss`, `get_bbox_loss`).

Every function takes plain tensors so that it can be tested on hand-made inputs and shared by the heads.

Deliberate differences from the official code (each behind a config switch where the official behaviour can be
reproduced):

* Distributed ITC: the official `AllGather` backward returns only the local slice of the gradient, so after DDP
  averaging the ITC gradient is 1/world_size of the full-batch gradient. `gather_with_grad` sums the gradient over
  processes (an all-reduce of the gathered gradient, as `torch.distributed.nn.functional.all_gather`), which makes
  N processes equal one process on the concatenated batch. `official_gradient_scaling=True` (`config.official_itc_gradient_scaling`) restores the
  official behaviour. Without an initialised process group the loss runs on the local batch (the official code
  then crashes).
* GIoU: the official code zeroes the GIoU loss of the whole batch when any box is degenerate (x1 < x0 or y1 < y0).
  `bbox_losses` masks the GIoU term of that box only; `official_batch_zeroing=True`
  (`config.official_giou_batch_zeroing`) restores the official behaviour. When no entry has a box (every entry a
  whole-image caption) both box losses are 0 instead of 0/0.
* ITM hard negatives: rows without any admissible negative (batch of one, or every other entry is a positive) get
  no negative pair instead of crashing `torch.multinomial`; their negative pairs are ignored by the loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .box_ops import box_convert, elementwise_generalized_box_iou

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "bbox_losses",
    "distributed_world",
    "gather_with_grad",
    "gather_no_grad",
    "image_text_contrastive_loss",
    "image_text_matching_loss",
    "mask_excluded_boxes",
    "masked_lm_loss",
    "sample_hard_negatives",
]


# ----------------------------------------------------------------------------------------------------------------
# Distributed gathering
# ----------------------------------------------------------------------------------------------------------------


def distributed_world() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group, `(0, 1)` when `torch.distributed` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathered_sizes(tensor: torch.Tensor, world_size: int) -> list[int]:
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def _all_gather_rows(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    rows = max(sizes)
    parts = [tensor.new_empty((rows, *tensor.shape[1:])) for _ in sizes]
    dist.all_gather(parts, _pad_rows(tensor.contiguous(), rows))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


class _AllGatherSumGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient of this process's rows over all processes (all-reduce), i.e. the
    exact gradient of a loss that every process computes on the gathered batch. Works on every backend (gloo too)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.start, ctx.rows = sum(sizes[:rank]), sizes[rank]
        return _all_gather_rows(tensor, sizes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.rows], None, None


class _OfficialAllGather(_AllGatherSumGrad):
    """The official `AllGather`: forward gathers, backward returns only the local slice (no sum over processes)."""

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output[ctx.start : ctx.start + ctx.rows], None, None


def gather_with_grad(tensor: torch.Tensor, official_gradient_scaling: bool = False) -> torch.Tensor:
    """Concatenate `tensor` `(n_local, ...)` from all processes along dim 0, in rank order, keeping gradients.

    The backward pass sums, over processes, the gradients of the gathered copies of this process's rows (an
    all-reduce, as `torch.distributed.nn.functional.all_gather` does with a reduce-scatter), so that with DDP's
    gradient averaging the result equals the gradient of one process on the concatenated batch.
    `accelerate.utils.gather` is not differentiable. Processes may hold different numbers of rows (they are padded
    for the collective and unpadded after).

    Args:
        tensor: the local rows.
        official_gradient_scaling: reproduce the official `AllGather` (backward keeps only the local slice, so the
            gradient is 1/world_size of the full-batch one after DDP averaging).

    Returns:
        `(sum of n_local, ...)`; the tensor itself when `torch.distributed` is not initialised or has one process.
    """
    rank, world_size = distributed_world()
    if world_size == 1:
        return tensor
    sizes = _gathered_sizes(tensor, world_size)
    function = _OfficialAllGather if official_gradient_scaling else _AllGatherSumGrad
    return function.apply(tensor, rank, sizes)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all processes along dim 0 without gradients (e.g. image ids)."""
    _, world_size = distributed_world()
    if world_size == 1:
        return tensor
    return _all_gather_rows(tensor, _gathered_sizes(tensor, world_size))


# ----------------------------------------------------------------------------------------------------------------
# ITC
# ----------------------------------------------------------------------------------------------------------------


def image_text_contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
    gather: bool | None = None,
    official_gradient_scaling: bool = False,
) -> torch.Tensor:
    """Symmetric ITC loss (official `get_contrastive_loss`).

    Args:
        image_feat: `(B, E)` L2-normalised image (or region) features.
        text_feat: `(B, E)` L2-normalised text features; row i is paired with image row i.
        temp: the temperature; logits are `image_feat @ text_feat.T / temp`.
        image_ids: optional `(B,)` integer ids; all pairs that share an id are positives, with soft targets
            `pos / pos.sum(row)` (official `idx` path). Ids must be unique across processes when gathering.
        gather: use the features of every process as negatives (`gather_with_grad`). `None` (default) gathers when
            `torch.distributed` is initialised with more than one process.
        official_gradient_scaling: see `gather_with_grad`.

    Returns:
        `()` mean of the image-to-text and text-to-image cross-entropies over the (global) batch; every process
        gets the same value, the loss of one process on the concatenated batch.
    """
    if image_feat.shape[0] != text_feat.shape[0]:
        raise ValueError(
            f"ITC needs aligned pairs, got {image_feat.shape[0]} image and {text_feat.shape[0]} text features."
        )
    if gather is None:
        gather = distributed_world()[1] > 1
    if gather:
        image_feat = gather_with_grad(image_feat, official_gradient_scaling)
        text_feat = gather_with_grad(text_feat, official_gradient_scaling)
        if image_ids is not None:
            image_ids = gather_no_grad(image_ids)
    logits = image_feat @ text_feat.t() / temp
    if image_ids is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    image_ids = image_ids.view(-1)
    if image_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"image_ids has {image_ids.shape[0]} entries for a batch of {logits.shape[0]} pairs.")
    positives = (image_ids.view(-1, 1) == image_ids.view(1, -1)).to(logits.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


# ----------------------------------------------------------------------------------------------------------------
# ITM
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    positive_mask: torch.Tensor | None = None,
    smoothing: float = 1e-5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one hard negative text per image and one hard negative image per text (official `get_matching_loss`).

    Weights are `softmax(sim, dim=1) + smoothing`, set to 0 on positives; all rows are drawn in one
    `torch.multinomial` call per direction.

    Args:
        sim_i2t: `(B, B)` image-to-text similarities (already divided by the temperature); the text-to-image
            similarities are its transpose.
        positive_mask: `(B, B)` bool, True where image i and text j match (may be excluded from negatives).
            Defaults to the diagonal; the diagonal is always treated as positive.
        smoothing: added to the softmax weights before masking (official 1e-5).
        generator: optional random generator.

    Returns:
        `(neg_image_for_text, neg_text_for_image, text_has_negative, image_has_negative)`, each `(B,)`. Rows
        with no admissible negative (e.g. `B == 1`) get index 0 and `has_negative=False`; callers must ignore them.
    """
    batch = sim_i2t.shape[0]
    if sim_i2t.dim() != 2 or sim_i2t.shape[1] != batch:
        raise ValueError(f"sim_i2t must be square (B, B), got {tuple(sim_i2t.shape)}.")
    eye = torch.eye(batch, dtype=torch.bool, device=sim_i2t.device)
    positives = eye if positive_mask is None else (positive_mask.to(torch.bool) | eye)
    sim = sim_i2t.float()
    weights_i2t = (F.softmax(sim, dim=1) + smoothing).masked_fill(positives, 0.0)
    weights_t2i = (F.softmax(sim.t(), dim=1) + smoothing).masked_fill(positives.t(), 0.0)

    def draw(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = weights.sum(dim=1) > 0
        safe = torch.where(valid[:, None], weights, torch.ones_like(weights))
        index = torch.multinomial(safe, 1, generator=generator).squeeze(1)
        return torch.where(valid, index, torch.zeros_like(index)), valid

    # Same order as the official code (negative images for the texts first), so a seeded run draws the same pairs.
    neg_image_for_text, text_valid = draw(weights_t2i)
    neg_text_for_image, image_valid = draw(weights_i2t)
    return neg_image_for_text, neg_text_for_image, text_valid, image_valid


def image_text_matching_loss(
    logits: torch.Tensor, text_has_negative: torch.Tensor, image_has_negative: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM cross-entropy over `[positives; (neg image, text); (image, neg text)]` logits `(3B, 2)`.

    Labels are `[1] * B + [0] * 2B` (class 1 = match); negative pairs without an admissible negative get
    `IGNORE_INDEX`. Returns `(loss, labels)`.
    """
    batch = text_has_negative.shape[0]
    if logits.shape != (3 * batch, 2):
        raise ValueError(f"ITM logits must have shape (3B, 2) = {(3 * batch, 2)}, got {tuple(logits.shape)}.")
    ones = torch.ones(batch, dtype=torch.long, device=logits.device)
    zeros = torch.zeros(batch, dtype=torch.long, device=logits.device)
    ignore = torch.full_like(zeros, IGNORE_INDEX)
    labels = torch.cat(
        [
            ones,
            torch.where(text_has_negative.to(logits.device), zeros, ignore),
            torch.where(image_has_negative.to(logits.device), zeros, ignore),
        ]
    )
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX), labels


# ----------------------------------------------------------------------------------------------------------------
# MLM
# ----------------------------------------------------------------------------------------------------------------


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the positions whose label is not `-100` (official `masked_pos` path, HF convention).

    Args:
        logits: `(..., vocab)` predictions, either for every position (`labels` of the same leading shape) or
            already restricted to the labelled positions.
        labels: target ids, `-100` where no prediction is wanted.

    Returns:
        `()` mean over labelled positions; 0 (connected to the graph) when no position is labelled.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"MLM logits cover {logits.shape[0]} positions but labels {labels.shape[0]}.")
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------------------


#: The target that replaces a whole-image entry's box before the box losses are computed (any finite box would do).
WHOLE_IMAGE_BOX = (0.5, 0.5, 1.0, 1.0)


def mask_excluded_boxes(
    target_boxes: torch.Tensor, is_image: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(targets, weight)`: the `(B, 4)` targets with the rows `is_image` excludes replaced by `WHOLE_IMAGE_BOX`, and
    the `(B,)` box-loss weight `1 - is_image` (all ones without `is_image`).

    The replacement happens before any arithmetic, so a NaN or garbage target on an excluded row can reach neither
    the loss nor its gradient (a zero weight applied afterwards would not help: `NaN * 0 = NaN`). `is_image` must
    hold only 0 and 1 (`ValueError` otherwise)."""
    if is_image is None:
        return target_boxes, torch.ones(target_boxes.shape[0], dtype=target_boxes.dtype, device=target_boxes.device)
    is_image = torch.as_tensor(is_image, device=target_boxes.device).view(-1)
    if is_image.shape[0] != target_boxes.shape[0]:
        raise ValueError(f"is_image has {is_image.shape[0]} entries for {target_boxes.shape[0]} boxes.")
    if not bool(((is_image == 0) | (is_image == 1)).all()):
        raise ValueError(
            f"is_image must hold 0 (a region, box losses on) or 1 (the whole image, no box loss), got values "
            f"{torch.unique(is_image).tolist()[:8]}."
        )
    excluded = is_image.bool()
    placeholder = torch.tensor(WHOLE_IMAGE_BOX, dtype=target_boxes.dtype, device=target_boxes.device)
    targets = torch.where(excluded[:, None], placeholder, target_boxes)
    return targets, (~excluded).to(target_boxes.dtype)


def bbox_losses(
    pred_boxes: torch.Tensor,
    target_boxes: torch.Tensor,
    is_image: torch.Tensor | None = None,
    official_batch_zeroing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 and GIoU box losses (official `get_bbox_loss`), both on normalised `(cx, cy, w, h)` boxes.

    `l1 = sum over boxes and coordinates |pred - target| / num_boxes`, `giou = sum over boxes (1 - GIoU) /
    num_boxes`, where entries with `is_image == 1` (whole-image captions) are excluded and
    `num_boxes = sum(1 - is_image)` (or `B`).

    Degenerate boxes (x1 < x0 or y1 < y0 after conversion): by default the GIoU term of that box alone is dropped
    (its L1 term is kept); with `official_batch_zeroing=True` the GIoU loss of the whole batch is 0, as the
    official code. Zero-area boxes give a finite GIoU (`elementwise_generalized_box_iou` adds an epsilon). With no
    box at all both losses are 0, never NaN.

    Args:
        pred_boxes: `(B, 4)` predicted boxes.
        target_boxes: `(B, 4)` targets.
        is_image: optional `(B,)`, 1 for whole-image entries that have no box loss.
        official_batch_zeroing: reproduce the official whole-batch GIoU zeroing.

    Returns:
        `(loss_l1, loss_giou)`, two scalars.
    """
    if pred_boxes.shape != target_boxes.shape or pred_boxes.dim() != 2 or pred_boxes.shape[-1] != 4:
        raise ValueError(
            f"pred_boxes and target_boxes must both be (B, 4), got {tuple(pred_boxes.shape)} and "
            f"{tuple(target_boxes.shape)}."
        )
    target_boxes, weight = mask_excluded_boxes(target_boxes.to(pred_boxes.dtype), is_image)
    l1 = (pred_boxes - target_boxes).abs().sum(dim=1)
    pred_xyxy = box_convert(pred_boxes, "cxcywh", "xyxy")
    target_xyxy = box_convert(target_boxes, "cxcywh", "xyxy")
    degenerate = (pred_xyxy[:, 2:] < pred_xyxy[:, :2]).any(dim=1) | (target_xyxy[:, 2:] < target_xyxy[:, :2]).any(
        dim=1
    )
    giou = 1.0 - elementwise_generalized_box_iou(pred_xyxy, target_xyxy)
    if official_batch_zeroing:
        if bool(degenerate.any()):
            giou = giou * 0.0
    else:
        giou = torch.where(degenerate, torch.zeros_like(giou), giou)

    num_boxes = weight.sum()
    if float(num_boxes) == 0.0:
        zero = pred_boxes.sum() * 0.0
        return zero, zero.clone()
    return (l1 * weight).sum() / num_boxes, (giou * weight).sum() / num_boxes
