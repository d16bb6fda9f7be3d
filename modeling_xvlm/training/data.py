"""Data pipeline of ``xvlm-train``: schema rows -> task rows, and step-indexed, seeded batches.

A batch is a pure function of ``(seed, stream, step, rank)``: :class:`StepBatchSampler` draws the example indices of
step ``s`` from a per-epoch permutation (seeded by ``seed`` and the epoch) and attaches a batch seed; the collate
function (:class:`SeededCollate`) re-seeds the collator's RNGs with it before building the batch. The training loop
therefore resumes at any step without replaying the data: the data position is just the step counters. The loaders
also use their own ``torch.Generator`` so that creating them never consumes the global torch RNG.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .collators import reseed

__all__ = [
    "CaptionRecords",
    "caption_lists",
    "pretrain_image_text_row",
    "pretrain_region_row",
    "StepBatchSampler",
    "IndexedRows",
    "SeededCollate",
    "PretrainImageTextCollator",
    "make_loader",
    "derive_seed",
]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes and Python hash seeds)."""
    return random.Random("-".join(str(p) for p in parts)).getrandbits(63)


# ----------------------------------------------------------------------------------------------------------------
# Row adapters (dataset schema -> collator rows)
# ----------------------------------------------------------------------------------------------------------------


def pretrain_image_text_row(row: dict) -> dict:
    """``pretrain`` schema row -> ``{"image", "caption": [captions]}`` (a random caption is picked per batch)."""
    captions = list(row.get("captions") or [])
    if not captions:
        raise ValueError(f"pretrain row {row.get('image_id')!r} has no whole-image caption")
    return {"image": row["image"], "caption": captions}


def pretrain_region_row(row: dict) -> dict:
    """``pretrain`` schema row -> a region row for ``XVLMPretrainCollator``: ``{"image", "caption", "objects":
    [{"bbox", "caption", "attributes"}]}`` (the whole-image caption takes one region slot, official `RegionTextJsonDataset`)."""
    objects = [
        {"bbox": list(o["bbox"]), "caption": list(o.get("captions") or []) or None,
         "attributes": list(o.get("attributes") or [])}
        for o in row.get("objects") or []
    ]
    captions = list(row.get("captions") or []) or None
    return {"image": row["image"], "caption": captions, "objects": objects}


def caption_lists(dataset: Any, n: int | None = None) -> list[list[str]]:
    """The ``captions`` of the first ``n`` rows of a ``retrieval``-schema dataset, without decoding any image (a
    ``datasets.Dataset`` is read by its text column)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    names = getattr(dataset, "column_names", None)
    if names is not None:
        column = "captions" if "captions" in names else "caption"
        values = dataset.select_columns([column])[:n][column]
    else:
        values = [dataset[i]["captions"] if "captions" in dataset[i] else dataset[i]["caption"] for i in range(n)]
    return [[v] if isinstance(v, str) else list(v or []) for v in values]


class CaptionRecords(Dataset):
    """One record per (image, caption) of ``retrieval`` rows (one row per image with its ``captions``), as the
    official captioning training file holds them (``coco_karpathy_train.json``: one record per annotation), so
    that an epoch visits every caption once and an image as often as it has captions.

    ``records[k]`` is the image's row with ``caption`` = its ``j``-th caption; the images are read only when a
    record is. Images without captions are an error.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.index: list[tuple[int, int]] = []
        for i, captions in enumerate(caption_lists(dataset)):
            if not captions:
                raise ValueError(f"retrieval row {i} (image_id {_row_id(dataset, i)!r}) has no captions")
            self.index.extend((i, j) for j in range(len(captions)))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, j = self.index[int(k)]
        row = dict(self.dataset[i])
        row["caption"] = list(row["captions"])[j]
        return row


def _row_id(dataset: Any, i: int) -> Any:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return dataset.select_columns(["image_id"])[i]["image_id"] if "image_id" in names else i
    return dataset[i].get("image_id", i)


# ----------------------------------------------------------------------------------------------------------------
# Step-indexed sampling
# ----------------------------------------------------------------------------------------------------------------


class StepBatchSampler(Sampler):
    """Yields, for steps ``start_step, start_step + 1, ...``, this rank's ``batch_size`` examples as
    ``(index, batch_seed)`` pairs.

    Epoch ``e`` is a permutation of ``range(num_examples)`` seeded by ``(seed, stream, e)``; a step takes the next
    ``batch_size * world_size`` indices (the last incomplete global batch of an epoch is dropped, official
    ``drop_last=True``) and this rank takes its contiguous slice.

    Args:
        num_examples: dataset size.
        batch_size: examples per rank and step.
        seed, stream: the base seed and the name of this stream (e.g. ``"image"``, ``"region"``).
        rank, world_size: this process and the number of processes.
        start_step: first step to yield (resume).
        num_steps: how many steps to yield (``None``: forever).
        shuffle: permute each epoch (``False``: in order, for evaluation-like use).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int = 0,
        stream: str = "train",
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_steps: int | None = None,
        shuffle: bool = True,
    ) -> None:
        if num_examples < batch_size * world_size:
            raise ValueError(
                f"the dataset has {num_examples} examples, fewer than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.num_steps = num_steps
        self.shuffle = shuffle
        self.steps_per_epoch = num_examples // (batch_size * world_size)
        self._perm_epoch: int | None = None
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, self.stream, "epoch", epoch))
                self._perm = torch.randperm(self.num_examples, generator=g).tolist()
            else:
                self._perm = list(range(self.num_examples))
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> list[int]:
        """The example indices of this rank at ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start = within * self.batch_size * self.world_size + self.rank * self.batch_size
        return perm[start : start + self.batch_size]

    def batch_seed(self, step: int) -> int:
        return derive_seed(self.seed, self.stream, "batch", step, self.rank)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            seed = self.batch_seed(step)
            yield [(i, seed) for i in self.indices(step)]
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless StepBatchSampler has no length")
        return self.num_steps


class IndexedRows(Dataset):
    """``dataset[index]`` passed through ``adapter``; items are ``(row, batch_seed)`` for :class:`SeededCollate`."""

    def __init__(self, dataset: Any, adapter: Callable[[dict], dict] | None = None) -> None:
        self.dataset = dataset
        self.adapter = adapter

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict, int]:
        index, seed = key
        row = dict(self.dataset[int(index)])
        return (self.adapter(row) if self.adapter is not None else row), seed


class SeededCollate:
    """Re-seed ``collator`` (see :func:`~modeling_xvlm.training.collators.reseed`) with the batch seed, then
    collate the rows."""

    def __init__(self, collator: Callable[[Sequence[dict]], Any]) -> None:
        self.collator = collator

    def __call__(self, items: Sequence[tuple[dict, int]]) -> Any:
        reseed(self.collator, items[0][1])
        return self.collator([row for row, _ in items])


class PretrainImageTextCollator:
    """Pre-training image-text batches: pick a random caption per row, apply the official ``pretrain_transform``
    (``transform``, an :class:`~modeling_xvlm.training.collators.XVLMImageTextTransform`), then build the batch
    with ``inner`` (an ``XVLMPretrainCollator``: MLM masking, all-ones region masks, ``is_image = 1``)."""

    def __init__(self, inner: Any, transform: Any) -> None:
        self.inner = inner
        self.transform = transform
        self.rng = random.Random()

    def __call__(self, rows: Sequence[dict]) -> Any:
        out = []
        for row in rows:
            captions = row["caption"]
            caption = captions if isinstance(captions, str) else self.rng.choice(list(captions))
            out.append({"image": self.transform(row["image"], [caption]), "caption": caption})
        return self.inner(out)


def make_loader(
    dataset: Any,
    collator: Callable[[Sequence[dict]], Any],
    sampler: StepBatchSampler,
    adapter: Callable[[dict], dict] | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A ``DataLoader`` over ``sampler``'s steps whose batches are built by the seeded ``collator``."""
    return DataLoader(
        IndexedRows(dataset, adapter),
        batch_sampler=sampler,
        collate_fn=SeededCollate(collator),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),  # never touch the global RNG (exact resume)
        persistent_workers=False,
    )
