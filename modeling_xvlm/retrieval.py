"""Image-text retrieval inference and metrics (official `Retrieval.py::evaluation` and `itm_eval`).

Protocol: encode every image and every text once; rank all pairs by the ITC cosine similarity (no temperature);
re-rank the top `k` candidates of every image (texts) and of every text (images) with the raw ITM logit of class
"match". The official evaluation matrices hold -100 outside the top-k (`score_matrices`), and `retrieval_metrics`
reproduces `itm_eval`.

One owner per step, used by `XVLMForRetrieval` (`itm_scores`, `rank`), `xvlm-eval` and the pipelines:

- `itm_scores`: the ITM score of (text, image) pairs (`fuse(..., cls_only=True)` -> `itm_head(cls)[:, 1]`);
- `encode_images` / `encode_texts`: gallery encoding, each item once, in batches;
- `rank_gallery`: ranking of an encoded gallery, the fast path: a pair that is a candidate in both directions is
  fused once; each distinct image's cross-attention keys/values are computed once per fusion layer and batch
  (`image_index`); batches mix pairs of many images; pairs are ordered by text length and each batch is cut to its
  longest text (padding positions are masked keys, so they never change a score);
- `retrieve`: the orchestration (encode, rank, and the precision handling: fp32 / bf16 autocast, `encode_precision`,
  `refine_top1`).

`official_protocol_scores` keeps the official loops (nothing shared, full fusion) as the benchmark baseline; it
scores through `itm_scores` too. In fp32 both give the same scores to float rounding and identical rankings
(`tests/test_fast_paths.py`, `docs/benchmarks.md`).

Low precision: `refine_top1` re-scores the near ties of a bf16 ranking in fp32, so that each query keeps the fp32
top-1 among its candidates; `itc_similarity` keeps the candidate selection in fp32.

This module imports only torch, numpy, tqdm and transformers' `ModelOutput` (no head module); `model` is any model with
`xvlm` (an `XVLMModel`; or the `XVLMModel` itself for the encoders and an ITC-only ranking) and, for ITM scores,
`itm_head`. Its results (`EncodedImages`, `EncodedTexts`, `RetrievalOutput`) are `ModelOutput`s: fields by attribute,
by key (`output["similarity"]`) or by position (`to_tuple()`, which leaves out `None` fields).
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from collections.abc import Callable, Iterator
from typing import Any, Union

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)

__all__ = [
    "EncodedImages",
    "EncodedTexts",
    "ImageSource",
    "RetrievalOutput",
    "TextSource",
    "effective_lengths",
    "encode_images",
    "encode_texts",
    "itc_similarity",
    "itm_scores",
    "official_protocol_scores",
    "rank_gallery",
    "refine_top1",
    "retrieval_metrics",
    "retrieve",
    "score_matrices",
    "score_pairs",
]

PRECISIONS = ("fp32", "bf16")


@dataclass
class EncodedImages(ModelOutput):
    """An encoded image gallery: `sequences` `(n, 1 + P, vision_width)` and ITC features `(n, projection_dim)`."""

    sequences: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def float(self) -> EncodedImages:
        return EncodedImages(self.sequences.float(), self.features.float())


@dataclass
class EncodedTexts(ModelOutput):
    """An encoded text gallery: text-encoder `states` `(n, L, hidden)`, `attention_mask` `(n, L)` and ITC
    `features` `(n, projection_dim)`."""

    states: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def float(self) -> EncodedTexts:
        return EncodedTexts(self.states.float(), self.attention_mask, self.features.float())


@dataclass
class RetrievalOutput(ModelOutput):
    """Result of `rank_gallery` / `XVLMForRetrieval.rank` / `XVLMModel.rank` (ITC only).

    Args:
        i2t_indices: `(n_images, k)` text indices for each image, best first (by ITM logit; by ITC similarity
            without re-ranking).
        i2t_scores: `(n_images, k)` their raw ITM logits (ITC cosine similarities without re-ranking).
        t2i_indices: `(n_texts, k)` image indices for each text, best first.
        t2i_scores: `(n_texts, k)` their raw ITM logits (ITC cosine similarities without re-ranking).
        similarity: `(n_images, n_texts)` ITC cosine similarities of all pairs (no temperature).
        num_pairs_scored: number of distinct (image, text) pairs that went through the fusion encoder (0 without
            re-ranking).
        num_pairs_refined: pairs re-scored in fp32 by `refine_top1` (0 when not refined).
        top1_margin: the margin `refine_top1` used in the end (`None` when not refined).
    """

    i2t_indices: torch.Tensor | None = None
    i2t_scores: torch.Tensor | None = None
    t2i_indices: torch.Tensor | None = None
    t2i_scores: torch.Tensor | None = None
    similarity: torch.Tensor | None = None
    num_pairs_scored: int | None = None
    num_pairs_refined: int | None = None
    top1_margin: float | None = None

    def __post_init__(self) -> None:
        # ModelOutput fields must default to None; the counts mean 0 when not given.
        if self.num_pairs_scored is None:
            self.num_pairs_scored = 0
        if self.num_pairs_refined is None:
            self.num_pairs_refined = 0
        super().__post_init__()


def batch_slices(n: int, batch_size: int, desc: str | None = None, progress: bool = False) -> Iterator[slice]:
    """`slice`s of `range(n)`, `batch_size` items each; with `progress`, a tqdm bar `desc` counting the items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    with tqdm(total=n, desc=desc, disable=not progress, mininterval=1.0, dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            part = slice(start, min(start + batch_size, n))
            yield part
            bar.update(part.stop - part.start)


def _xvlm(model: Any) -> Any:
    """The base model (`XVLMModel`) of a head, or the model itself."""
    return getattr(model, "xvlm", model)


def _parameter(model: Any) -> torch.Tensor:
    return next(model.parameters())


def _autocast(model: Any, precision: str):
    return torch.autocast(_parameter(model).device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def itm_scores(
    model: Any,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    image_index: torch.LongTensor | None = None,
    image_attention_mask: torch.Tensor | None = None,
    cls_only: bool = True,
) -> torch.Tensor:
    """Raw ITM logit of class "match" `(B,)` (official `itm_head(fused_cls)[:, 1]`, no softmax): the one place that
    scores (text, image) pairs.

    `image_embeds` `(n, 1 + P, vision_width)` are encoded images, `text_embeds` `(B, L, hidden)` text-encoder states
    with their `attention_mask`; text b is paired with image b, or with image `image_index[b]` (each image's keys and
    values are then computed once for all its texts). `cls_only=False` runs the last fusion layer on every row (the
    official code; same scores), `model` is any model with `xvlm` and `itm_head`.
    """
    fused = model.xvlm.fuse(
        text_embeds, attention_mask, image_embeds, image_attention_mask, image_index=image_index, cls_only=cls_only
    )
    return model.itm_head(fused[:, 0])[:, 1]


@torch.no_grad()
def encode_images(
    model: Any,
    images: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    num_images: int | None = None,
    progress: bool = False,
) -> EncodedImages:
    """Encode each image once, in batches: sequences and ITC features (on the model's device).

    `images`: pixel values `(n, 3, H, W)`, or a function `indices -> pixel values` (images loaded per batch) with
    `num_images`. `progress`: a progress bar."""
    if isinstance(images, torch.Tensor):
        num_images = images.shape[0]
    elif num_images is None:
        raise ValueError("num_images is needed when images is a function.")
    parameter = _parameter(model)
    dtype = parameter.dtype if parameter.dtype.is_floating_point else None
    sequences, features = [], []
    for part in batch_slices(num_images, batch_size, "encode images", progress):
        if isinstance(images, torch.Tensor):
            pixels = images[part]
        else:
            pixels = images(torch.arange(part.start, part.stop))
        out = _xvlm(model).get_image_features(pixels.to(parameter.device, dtype))
        sequences.append(out.last_hidden_state)
        features.append(out.pooler_output)
    return EncodedImages(torch.cat(sequences), torch.cat(features))


@torch.no_grad()
def encode_texts(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, batch_size: int = 64,
    progress: bool = False,
) -> EncodedTexts:
    """Encode each text once, in batches: text-encoder states, masks and ITC features (on the model's device).
    `progress`: a progress bar."""
    device = _parameter(model).device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    states, features = [], []
    for part in batch_slices(input_ids.shape[0], batch_size, "encode texts", progress):
        out = _xvlm(model).get_text_features(input_ids[part], attention_mask[part])
        states.append(out.last_hidden_state)
        features.append(out.pooler_output)
    return EncodedTexts(torch.cat(states), attention_mask, torch.cat(features))


def effective_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(n,)`: one past the last attended position of each row (at least 1); later positions are padding."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.ne(0).long() * positions).amax(dim=1).clamp(min=1)


def itc_similarity(images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
    """`(n_images, n_texts)` ITC cosine similarities (no temperature), in fp32 even under autocast: a bf16 matmul
    would reorder near-equal candidates at the k-th position of the top-k, for a negligible saving."""
    with torch.autocast(images.features.device.type, enabled=False):
        return images.features.float() @ texts.features.float().t()


@torch.no_grad()
def score_pairs(
    model: Any,
    images: EncodedImages,
    texts: EncodedTexts,
    image_idx: torch.Tensor,
    text_idx: torch.Tensor,
    batch_size: int = 64,
    trim_padding: bool = True,
    length_bucket: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """ITM logits `(n_pairs,)` (float32, `itm_scores`) of the pairs `(image_idx[p], text_idx[p])`, in fusion
    batches of `batch_size` pairs.

    Within a batch each distinct image is fused once for all its texts (`image_index`: its keys/values are
    computed once per fusion layer). Pairs are processed ordered by image; with `trim_padding` (default) they are
    first grouped by text length (buckets of `length_bucket` tokens) and each batch is cut to its longest text,
    which leaves every score unchanged (the cut positions are masked padding). `progress`: a progress bar.
    """
    n_pairs = image_idx.shape[0]
    scores = torch.empty(n_pairs, dtype=torch.float32, device=images.sequences.device)
    if n_pairs == 0:
        return scores
    n_images, n_texts = images.sequences.shape[0], texts.states.shape[0]
    order_key = image_idx * n_texts + text_idx
    lengths = None
    if trim_padding:
        lengths = effective_lengths(texts.attention_mask)[text_idx]
        bucket = torch.div(lengths + length_bucket - 1, length_bucket, rounding_mode="floor")
        order_key = bucket * (n_images * n_texts) + order_key
    order = order_key.argsort()
    for part in batch_slices(n_pairs, batch_size, "ITM re-ranking (pairs)", progress):
        rows = order[part]
        img, txt = image_idx[rows], text_idx[rows]
        length = int(lengths[rows].max()) if lengths is not None else texts.states.shape[1]
        unique_images, local_image = torch.unique(img, return_inverse=True)
        scores[rows] = itm_scores(
            model,
            images.sequences[unique_images],
            texts.states[txt, :length],
            texts.attention_mask[txt, :length],
            image_index=local_image,
        ).float()
    return scores


DIRECTIONS = ("both", "i2t", "t2i")


@torch.no_grad()
def rank_gallery(
    model: Any,
    images: EncodedImages,
    texts: EncodedTexts,
    k: int = 16,
    batch_size: int = 64,
    trim_padding: bool = True,
    directions: str = "both",
    rerank: bool = True,
    progress: bool = False,
) -> RetrievalOutput:
    """ITC top-`k` in both directions, then ITM re-ranking of the union of candidate pairs (each scored once).

    `batch_size` and `trim_padding` go to `score_pairs`; every choice gives the scores of
    `official_protocol_scores` (fp32: equal to float rounding, identical rankings). `directions="i2t"` (texts for
    each image) or `"t2i"` (images for each text) ranks one direction only; the other's indices and scores are then
    empty `(n, 0)`. `rerank=False` keeps the ITC order and scores (no ITM head needed). `progress`: a progress bar
    of the re-ranking."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}.")
    similarity = itc_similarity(images, texts)
    n_images, n_texts = similarity.shape
    k_i2t = min(k, n_texts) if directions != "t2i" else 0
    k_t2i = min(k, n_images) if directions != "i2t" else 0
    i2t_sims, i2t_candidates = similarity.topk(k_i2t, dim=1)  # (n_images, k_i2t) text ids
    t2i_sims, t2i_candidates = similarity.t().topk(k_t2i, dim=1)  # (n_texts, k_t2i) image ids
    if not rerank:
        return RetrievalOutput(i2t_candidates, i2t_sims, t2i_candidates, t2i_sims, similarity)

    # Pair id = image * n_texts + text; the union is deduplicated, so a pair in both directions is fused once.
    image_rows = torch.arange(n_images, device=similarity.device)
    text_rows = torch.arange(n_texts, device=similarity.device)
    i2t_ids = image_rows[:, None] * n_texts + i2t_candidates
    t2i_ids = t2i_candidates * n_texts + text_rows[:, None]
    pair_ids = torch.unique(torch.cat([i2t_ids.flatten(), t2i_ids.flatten()]))
    pair_scores = score_pairs(
        model,
        images,
        texts,
        torch.div(pair_ids, n_texts, rounding_mode="floor"),
        pair_ids % n_texts,
        batch_size,
        trim_padding=trim_padding,
        progress=progress,
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


#: Images for `refine_top1`: fp32 `EncodedImages` of the gallery, its pixel values `(n_images, 3, H, W)`, or a
#: function that returns the pixel values of the gallery images at the given indices (e.g. loading them on demand).
ImageSource = Union[EncodedImages, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
#: Texts for `refine_top1`: fp32 `EncodedTexts` of the gallery, or its `input_ids` `(n_texts, L)`.
TextSource = Union[EncodedTexts, torch.Tensor]


def _near_top_pairs(indices: torch.Tensor, scores: torch.Tensor, margin: float, i2t: bool, n_texts: int) -> torch.Tensor:
    """Pair ids of the candidates within `margin` of their query's best score, for queries with >= 2 of them."""
    near = scores >= scores[:, :1] - margin
    near &= near.sum(dim=1, keepdim=True) >= 2
    rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(indices)
    ids = rows * n_texts + indices if i2t else indices * n_texts + rows
    return ids[near]


def _fp32_images(model: Any, images: ImageSource, index: torch.Tensor, batch_size: int) -> EncodedImages:
    if isinstance(images, EncodedImages):
        index = index.to(images.sequences.device)
        return EncodedImages(images.sequences[index], images.features[index]).float()
    if isinstance(images, torch.Tensor):
        return encode_images(model, images[index.to(images.device)], batch_size)
    return encode_images(model, lambda rows: images(index[rows.to(index.device)]), batch_size, index.numel())


def _fp32_texts(model: Any, texts: TextSource, attention_mask: torch.Tensor | None, index: torch.Tensor,
                batch_size: int) -> EncodedTexts:
    if isinstance(texts, EncodedTexts):
        index = index.to(texts.states.device)
        return EncodedTexts(texts.states[index], texts.attention_mask[index], texts.features[index]).float()
    index = index.to(texts.device)
    mask = None if attention_mask is None else attention_mask.to(texts.device)[index]
    return encode_texts(model, texts[index], mask, batch_size)


def _gallery_size(source: Any) -> int | None:
    if isinstance(source, EncodedImages):
        return source.sequences.shape[0]
    if isinstance(source, EncodedTexts):
        return source.states.shape[0]
    return source.shape[0] if isinstance(source, torch.Tensor) else None


@torch.no_grad()
def refine_top1(
    model: Any,
    ranking: RetrievalOutput,
    images: ImageSource,
    texts: TextSource,
    attention_mask: torch.Tensor | None = None,
    margin: float = 0.1,
    batch_size: int = 64,
    max_rounds: int = 4,
) -> RetrievalOutput:
    """Give a ranking re-ranked in low precision (bf16 autocast) the top-1 of fp32, by re-scoring near ties in fp32.

    For every query (image in i2t, text in t2i) whose candidates within `margin` of its best ITM logit number two
    or more, those candidates are re-scored in fp32 (autocast off); every re-scored pair takes its fp32 logit in
    both directions and the rows are re-sorted. If each low-precision logit is within `margin / 2` of its fp32
    value, the fp32 best candidate of a query is always among the re-scored ones, so the top-1 equals the fp32
    top-1 among the query's candidates. The margin checks itself: when a re-scored pair shows a larger error, the
    margin grows to 2.5 x that error and the new near ties are re-scored (at most `max_rounds` rounds).

    The candidates themselves (the ITC top-k) are not changed: with fp32 encodings (`images`/`texts` given as
    `EncodedImages`/`EncodedTexts`, and the ranking computed from them) they are fp32's and the top-1 is the fp32
    pipeline's; with bf16 encodings they come from bf16 ITC similarities and can differ at the k-th candidate.

    Args:
        model: the `XVLMForRetrieval` that produced `ranking` (via `rank_gallery`).
        ranking: the low-precision `RetrievalOutput`.
        images: fp32 `EncodedImages` of the gallery, or pixel values `(n_images, 3, H, W)`, or a function
            `indices -> pixel values` (re-encoded in fp32 where needed).
        texts: fp32 `EncodedTexts` of the gallery, or `input_ids` `(n_texts, L)` with `attention_mask`.
        margin: initial margin in ITM logits (0.1: about 2x the largest bf16 error measured on a trained model).

    Returns:
        A new `RetrievalOutput` with the re-sorted candidates, `num_pairs_refined` and the final `top1_margin`.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    n_images, n_texts = ranking.similarity.shape
    if _gallery_size(texts) is not None and _gallery_size(texts) != n_texts:
        raise ValueError(f"texts has {_gallery_size(texts)} texts but the ranking has {n_texts}.")
    if _gallery_size(images) is not None and _gallery_size(images) != n_images:
        raise ValueError(f"images has {_gallery_size(images)} images but the ranking has {n_images}.")
    device = ranking.i2t_scores.device
    parameter = next(model.parameters())
    image_rows = torch.arange(n_images, device=device)[:, None]
    text_rows = torch.arange(n_texts, device=device)[:, None]
    # the low-precision score of every candidate pair, by pair id
    low_ids = torch.cat([(image_rows * n_texts + ranking.i2t_indices).flatten(),
                         (ranking.t2i_indices * n_texts + text_rows).flatten()])
    low_scores = torch.cat([ranking.i2t_scores.flatten(), ranking.t2i_scores.flatten()])
    low_ids, first = torch.unique(low_ids, return_inverse=True)
    low_scores = low_scores.new_empty(low_ids.shape).scatter_(0, first, low_scores)

    exact_ids = torch.empty(0, dtype=torch.long, device=device)
    exact_scores = torch.empty(0, dtype=torch.float32, device=device)
    verified = False
    for _ in range(max(max_rounds, 1)):
        wanted = torch.unique(torch.cat([
            _near_top_pairs(ranking.i2t_indices, ranking.i2t_scores, margin, True, n_texts),
            _near_top_pairs(ranking.t2i_indices, ranking.t2i_scores, margin, False, n_texts),
        ]))
        new_ids = wanted[~torch.isin(wanted, exact_ids)]
        if new_ids.numel() == 0:
            verified = True
            break
        image_ids = torch.unique(torch.div(new_ids, n_texts, rounding_mode="floor"))
        text_ids = torch.unique(new_ids % n_texts)
        with torch.autocast(parameter.device.type, enabled=False):
            scores = score_pairs(
                model,
                _fp32_images(model, images, image_ids, batch_size),
                _fp32_texts(model, texts, attention_mask, text_ids, batch_size),
                torch.searchsorted(image_ids, torch.div(new_ids, n_texts, rounding_mode="floor")).to(parameter.device),
                torch.searchsorted(text_ids, new_ids % n_texts).to(parameter.device),
                batch_size,
            ).to(device)
        exact_ids, order = torch.cat([exact_ids, new_ids]).sort()
        exact_scores = torch.cat([exact_scores, scores])[order]
        error = float((scores - low_scores[torch.searchsorted(low_ids, new_ids)]).abs().max())
        if 2 * error <= margin:
            verified = True
            break
        margin = 2.5 * error
    if not verified:
        logger.warning(
            "refine_top1: the low-precision ITM error still exceeded margin / 2 after %d rounds (margin now %.3g); "
            "the top-1 may differ from fp32. Pass a larger margin or max_rounds.", max_rounds, margin
        )

    def apply(indices: torch.Tensor, scores: torch.Tensor, i2t: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = image_rows if i2t else text_rows
        ids = rows * n_texts + indices if i2t else indices * n_texts + rows
        position = torch.searchsorted(exact_ids, ids).clamp(max=max(exact_ids.numel() - 1, 0))
        known = exact_ids[position] == ids if exact_ids.numel() else torch.zeros_like(ids, dtype=torch.bool)
        scores = torch.where(known, exact_scores[position] if exact_ids.numel() else scores, scores)
        order = scores.argsort(dim=1, descending=True, stable=True)
        return indices.gather(1, order), scores.gather(1, order)

    i2t_indices, i2t_scores = apply(ranking.i2t_indices, ranking.i2t_scores, True)
    t2i_indices, t2i_scores = apply(ranking.t2i_indices, ranking.t2i_scores, False)
    return RetrievalOutput(
        i2t_indices=i2t_indices,
        i2t_scores=i2t_scores,
        t2i_indices=t2i_indices,
        t2i_scores=t2i_scores,
        similarity=ranking.similarity,
        num_pairs_scored=ranking.num_pairs_scored,
        num_pairs_refined=int(exact_ids.numel()),
        top1_margin=margin,
    )


@torch.no_grad()
def retrieve(
    model: Any,
    images: ImageSource,
    texts: TextSource,
    attention_mask: torch.Tensor | None = None,
    k: int = 16,
    batch_size: int = 64,
    precision: str = "fp32",
    encode_precision: str | None = None,
    top1_margin: float | None = None,
    num_images: int | None = None,
    directions: str = "both",
    rerank: bool = True,
    progress: bool = False,
) -> RetrievalOutput:
    """Rank a gallery (official `Retrieval.py` protocol): encode (what is not encoded yet), ITC top-`k`, ITM
    re-ranking (`rank_gallery`); the orchestration behind `XVLMForRetrieval.rank`, `xvlm-eval` and the
    image-text-retrieval pipeline.

    Args:
        images: `EncodedImages`, pixel values `(n, 3, H, W)`, or a function `indices -> pixel values` (with
            `num_images`).
        texts: `EncodedTexts`, or `input_ids` `(n, L)` with `attention_mask`.
        batch_size: images / texts per encoder forward, and pairs per fusion batch.
        precision: of the ITM re-ranking, "fp32" or "bf16" (autocast on the model's device). With bf16, near ties
            are re-scored in fp32 (`refine_top1`, initial margin `top1_margin`, default 0.1; 0 turns it off), so
            each query keeps the fp32 top-1 among its candidates.
        encode_precision: of the image and text encoders (default: `precision`). fp32 encoders keep the fp32 ITC
            candidates, so a bf16 re-ranking then keeps the fp32 top-1 exactly; bf16 encodings are upcast for an
            fp32 re-ranking.
        directions, rerank: as in `rank_gallery`.
        progress: progress bars of the encoding and the re-ranking (`xvlm-eval`).
    """
    encode_precision = precision if encode_precision is None else encode_precision
    for name, value in (("precision", precision), ("encode_precision", encode_precision)):
        if value not in PRECISIONS:
            raise ValueError(f"{name} must be 'fp32' or 'bf16', got {value!r}.")
    if top1_margin is not None and precision == "fp32":
        raise ValueError("top1_margin only applies to precision='bf16' (fp32 rankings need no refinement).")
    with _autocast(model, encode_precision):
        encoded_images = images if isinstance(images, EncodedImages) else encode_images(
            model, images, batch_size, num_images, progress)
        encoded_texts = texts if isinstance(texts, EncodedTexts) else encode_texts(
            model, texts, attention_mask, batch_size, progress)
    if precision == "fp32":
        encoded_images, encoded_texts = encoded_images.float(), encoded_texts.float()
    with _autocast(model, precision):
        output = rank_gallery(
            model, encoded_images, encoded_texts, k=k, batch_size=batch_size, directions=directions, rerank=rerank,
            progress=progress,
        )
    margin = 0.1 if top1_margin is None else top1_margin
    if rerank and precision == "bf16" and margin > 0:
        if encode_precision == "fp32":  # the fp32 encodings are at hand: no re-encoding
            images, texts = encoded_images, encoded_texts
        output = refine_top1(model, output, images, texts, attention_mask, margin, batch_size)
    return output


@torch.no_grad()
def official_protocol_scores(
    model: Any, images: EncodedImages, texts: EncodedTexts, k: int = 16, fill_value: float = -100.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official re-ranking loops (`Retrieval.py::evaluation`, one process): the reference and the baseline.

    For each image, its top-`k` texts by ITC similarity are fused in one batch with the image sequence repeated `k`
    times (image mask all ones); then for each text, its top-`k` images, with the text repeated `k` times. No pair
    is shared between the loops and every pair recomputes the image keys/values, on the texts as padded by the
    caller (the official evaluation pads to 40 tokens), and the fusion runs on every row (`itm_scores(...,
    cls_only=False)`, as the official code). Scores are the raw ITM logit of class "match".

    Returns:
        `(scores_i2t (n_images, n_texts), scores_t2i (n_texts, n_images))`, float32, `fill_value` outside the
        top-k, as `score_matrices(rank_gallery(...))`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    sims = itc_similarity(images, texts)
    n_images, n_texts = sims.shape
    device = sims.device
    scores_i2t = torch.full((n_images, n_texts), fill_value, dtype=torch.float32, device=device)
    k_i2t = min(k, n_texts)
    for i in range(n_images):
        topk_idx = sims[i].topk(k_i2t, dim=0).indices
        encoder_output = images.sequences[i].repeat(k_i2t, 1, 1)
        encoder_att = torch.ones(encoder_output.shape[:-1], dtype=torch.long, device=device)
        scores_i2t[i, topk_idx] = itm_scores(
            model, encoder_output, texts.states[topk_idx], texts.attention_mask[topk_idx],
            image_attention_mask=encoder_att, cls_only=False,
        ).float()

    sims_t = sims.t()
    scores_t2i = torch.full((n_texts, n_images), fill_value, dtype=torch.float32, device=device)
    k_t2i = min(k, n_images)
    for t in range(n_texts):
        topk_idx = sims_t[t].topk(k_t2i, dim=0).indices
        encoder_output = images.sequences[topk_idx]
        encoder_att = torch.ones(encoder_output.shape[:-1], dtype=torch.long, device=device)
        scores_t2i[t, topk_idx] = itm_scores(
            model, encoder_output, texts.states[t].repeat(k_t2i, 1, 1), texts.attention_mask[t].repeat(k_t2i, 1),
            image_attention_mask=encoder_att, cls_only=False,
        ).float()
    return scores_i2t, scores_t2i


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
