"""Image-text retrieval inference and metrics (official `Retrieval.py::evaluation` and `itm_eval`).

Protocol: encode every image and every text once; rank all pairs by the ITC cosine similarity (no temperature);
re-rank the top `k` candidates of every image (texts) and of every text (images) with the raw ITM logit of class
"match". A pair that is a candidate in both directions is fused once. The official evaluation matrices hold -100
outside the top-k (`score_matrices`), and `retrieval_metrics` reproduces `itm_eval`.

This module imports only torch and numpy; the model is any `XVLMForRetrieval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "EncodedImages",
    "EncodedTexts",
    "RetrievalOutput",
    "encode_images",
    "encode_texts",
    "rank_gallery",
    "retrieval_metrics",
    "score_matrices",
    "score_pairs",
]


@dataclass
class EncodedImages:
    """An encoded image gallery: `sequences` `(n, 1 + P, vision_width)` and ITC features `(n, projection_dim)`."""

    sequences: torch.Tensor
    features: torch.Tensor


@dataclass
class EncodedTexts:
    """An encoded text gallery: text-encoder `states` `(n, L, hidden)`, `attention_mask` `(n, L)` and ITC
    `features` `(n, projection_dim)`."""

    states: torch.Tensor
    attention_mask: torch.Tensor
    features: torch.Tensor


@dataclass
class RetrievalOutput:
    """Result of `rank_gallery` / `XVLMForRetrieval.rank`.

    Args:
        i2t_indices: `(n_images, k)` text indices for each image, best first (by ITM logit).
        i2t_scores: `(n_images, k)` their raw ITM logits.
        t2i_indices: `(n_texts, k)` image indices for each text, best first.
        t2i_scores: `(n_texts, k)` their raw ITM logits.
        similarity: `(n_images, n_texts)` ITC cosine similarities of all pairs (no temperature).
        num_pairs_scored: number of distinct (image, text) pairs that went through the fusion encoder.
    """

    i2t_indices: torch.Tensor
    i2t_scores: torch.Tensor
    t2i_indices: torch.Tensor
    t2i_scores: torch.Tensor
    similarity: torch.Tensor
    num_pairs_scored: int = 0


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def encode_images(model: Any, pixel_values: torch.Tensor, batch_size: int = 64) -> EncodedImages:
    """Encode each image once, in batches: sequences and ITC features."""
    sequences, features = [], []
    for part in _batches(pixel_values.shape[0], batch_size):
        out = model.xvlm.get_image_features(pixel_values[part])
        sequences.append(out.last_hidden_state)
        features.append(out.pooler_output)
    return EncodedImages(torch.cat(sequences), torch.cat(features))


@torch.no_grad()
def encode_texts(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, batch_size: int = 64
) -> EncodedTexts:
    """Encode each text once, in batches: text-encoder states, masks and ITC features."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    states, features = [], []
    for part in _batches(input_ids.shape[0], batch_size):
        out = model.xvlm.get_text_features(input_ids[part], attention_mask[part])
        states.append(out.last_hidden_state)
        features.append(out.pooler_output)
    return EncodedTexts(torch.cat(states), attention_mask, torch.cat(features))


@torch.no_grad()
def score_pairs(
    model: Any,
    images: EncodedImages,
    texts: EncodedTexts,
    image_idx: torch.Tensor,
    text_idx: torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """Raw ITM logits `(n_pairs,)` of the pairs `(image_idx[p], text_idx[p])`, in fusion batches of `batch_size`
    pairs. Within a batch each distinct image is fused once for all its texts (`image_index` fast path), so sort the
    pairs by image for the fewest image key/value computations."""
    scores = torch.empty(image_idx.shape[0], dtype=images.sequences.dtype, device=images.sequences.device)
    for part in _batches(image_idx.shape[0], batch_size):
        img, txt = image_idx[part], text_idx[part]
        unique_images, local_index = torch.unique(img, return_inverse=True)
        scores[part] = model.itm_scores(
            image_embeds=images.sequences[unique_images],
            text_embeds=texts.states[txt],
            attention_mask=texts.attention_mask[txt],
            image_index=local_index,
        )
    return scores


@torch.no_grad()
def rank_gallery(
    model: Any, images: EncodedImages, texts: EncodedTexts, k: int = 16, batch_size: int = 64
) -> RetrievalOutput:
    """ITC top-`k` in both directions, then ITM re-ranking of the union of candidate pairs (each scored once)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    similarity = images.features @ texts.features.t()
    n_images, n_texts = similarity.shape
    k_i2t, k_t2i = min(k, n_texts), min(k, n_images)
    i2t_candidates = similarity.topk(k_i2t, dim=1).indices  # (n_images, k_i2t) text ids
    t2i_candidates = similarity.t().topk(k_t2i, dim=1).indices  # (n_texts, k_t2i) image ids

    # Pair id = image * n_texts + text; the union sorted by id is grouped by image.
    image_rows = torch.arange(n_images, device=similarity.device)
    text_rows = torch.arange(n_texts, device=similarity.device)
    i2t_ids = image_rows[:, None] * n_texts + i2t_candidates
    t2i_ids = t2i_candidates * n_texts + text_rows[:, None]
    pair_ids = torch.unique(torch.cat([i2t_ids.flatten(), t2i_ids.flatten()]))
    pair_scores = score_pairs(
        model, images, texts, torch.div(pair_ids, n_texts, rounding_mode="floor"), pair_ids % n_texts, batch_size
    )

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        return pair_scores[torch.searchsorted(pair_ids, ids.flatten())].view(ids.shape)

    i2t_scores = lookup(i2t_ids)
    t2i_scores = lookup(t2i_ids)
    i2t_order = i2t_scores.argsort(dim=1, descending=True, stable=True)
    t2i_order = t2i_scores.argsort(dim=1, descending=True, stable=True)
    return RetrievalOutput(
        i2t_indices=i2t_candidates.gather(1, i2t_order),
        i2t_scores=i2t_scores.gather(1, i2t_order),
        t2i_indices=t2i_candidates.gather(1, t2i_order),
        t2i_scores=t2i_scores.gather(1, t2i_order),
        similarity=similarity,
        num_pairs_scored=int(pair_ids.numel()),
    )


def score_matrices(output: RetrievalOutput, fill_value: float = -100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Official evaluation matrices from a ranking: `scores_i2t` `(n_images, n_texts)` and `scores_t2i`
    `(n_texts, n_images)` hold the raw ITM logit of each top-k candidate and `fill_value` (-100) elsewhere."""
    n_images, n_texts = output.similarity.shape
    scores_i2t = output.i2t_scores.new_full((n_images, n_texts), fill_value)
    scores_i2t.scatter_(1, output.i2t_indices, output.i2t_scores)
    scores_t2i = output.t2i_scores.new_full((n_texts, n_images), fill_value)
    scores_t2i.scatter_(1, output.t2i_indices, output.t2i_scores)
    return scores_i2t, scores_t2i


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def retrieval_metrics(
    scores_i2t: Any, scores_t2i: Any, txt2img: Any, img2txt: Any
) -> dict[str, float]:
    """Recall@K exactly as the official `itm_eval`.

    Args:
        scores_i2t: `(n_images, n_texts)` scores (higher is better).
        scores_t2i: `(n_texts, n_images)` scores.
        txt2img: `(n_texts,)` the image of each text.
        img2txt: for each image, the list of its ground-truth texts.

    Returns:
        `txt_r1, txt_r5, txt_r10` (text retrieval: an image's rank is the best rank of its ground-truth texts),
        `img_r1, img_r5, img_r10` (image retrieval: rank of the text's image), `txt_r_mean`, `img_r_mean` and
        `r_mean = (txt_r_mean + img_r_mean) / 2`, all in percent. Ranks come from the same
        `np.argsort(scores)[::-1]` as the official code, so ties are broken identically.
    """
    scores_i2t = _to_numpy(scores_i2t)
    scores_t2i = _to_numpy(scores_t2i)
    txt2img = _to_numpy(txt2img).astype(np.int64).reshape(-1)
    if scores_i2t.ndim != 2 or scores_t2i.shape != scores_i2t.shape[::-1]:
        raise ValueError(
            f"scores_i2t {scores_i2t.shape} and scores_t2i {scores_t2i.shape} must be (n_images, n_texts) and "
            "(n_texts, n_images)."
        )
    n_images, n_texts = scores_i2t.shape
    if txt2img.shape[0] != n_texts or len(img2txt) != n_images:
        raise ValueError(f"txt2img needs {n_texts} entries and img2txt {n_images}.")

    # Position of every column in the descending order of its row (inverse permutation of the official argsort).
    def positions(scores: np.ndarray) -> np.ndarray:
        order = np.argsort(scores, axis=1)[:, ::-1]
        pos = np.empty_like(order)
        np.put_along_axis(pos, order, np.arange(order.shape[1])[None, :].repeat(order.shape[0], 0), axis=1)
        return pos

    pos_i2t = positions(scores_i2t)
    txt_ranks = np.array(
        [pos_i2t[i, np.asarray(list(gt), dtype=np.int64)].min() if len(gt) else 1e20 for i, gt in enumerate(img2txt)],
        dtype=np.float64,
    )
    pos_t2i = positions(scores_t2i)
    img_ranks = pos_t2i[np.arange(n_texts), txt2img].astype(np.float64)

    def recall(ranks: np.ndarray, k: int) -> float:
        return 100.0 * len(np.where(ranks < k)[0]) / len(ranks)  # the official expression, to the last bit

    tr1, tr5, tr10 = recall(txt_ranks, 1), recall(txt_ranks, 5), recall(txt_ranks, 10)
    ir1, ir5, ir10 = recall(img_ranks, 1), recall(img_ranks, 5), recall(img_ranks, 10)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1,
        "txt_r5": tr5,
        "txt_r10": tr10,
        "txt_r_mean": tr_mean,
        "img_r1": ir1,
        "img_r5": ir5,
        "img_r10": ir10,
        "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }
