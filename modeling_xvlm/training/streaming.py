"""``xvlm-train pretrain --streaming``: the pre-training rows read as a ``datasets.IterableDataset``.

The stream of each process is ``split_dataset_by_node(load_dataset(..., streaming=True), rank, world_size)``,
shuffled with a buffer (``IterableDataset.shuffle(seed, buffer_size)``, reshuffled each pass with
``set_epoch``). Batches are built with the map-style path's collators and batch seeds (`SeededCollate`,
``derive_seed(seed, stream, "batch", step, rank)``), so only where the rows come from differs.

The stream position is ``(epoch, consumed)``: the pass over the stream and how many examples of it this process has
consumed. The stream is read in the main process (no DataLoader workers, no prefetching), so the examples the
dataset has yielded are exactly those consumed. Resume replays the pass and skips ``consumed`` examples: datasets'
own ``IterableDataset.state_dict()`` / ``load_state_dict()`` does not save the shuffle buffer (it is refilled
from later examples on resume), so it would not continue with the same examples; the replay does, at the cost of
re-reading the skipped examples once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from .data import SeededCollate, derive_seed

__all__ = ["StreamPosition", "StreamingBatches", "open_pretrain_stream"]

#: the trainer-state key of the stream positions (``{"image": [epoch, consumed], "region": [...]}``)
STATE_KEY = "stream_positions"


class StreamPosition(NamedTuple):
    """``(epoch, consumed)``: the pass over the stream and the examples of it consumed by this process."""

    epoch: int = 0
    consumed: int = 0


def open_pretrain_stream(
    source: str,
    split: str,
    rank: int,
    world_size: int,
    seed: int,
    shuffle_buffer: int,
    stream: str,
) -> Any:
    """This process's part of the ``pretrain`` configuration of ``source`` (folder or Hub id) as a shuffled
    ``datasets.IterableDataset`` (``shuffle_buffer`` 0: not shuffled). ``stream`` names the stream
    (``"image"``, ``"region"``) so that the two read in different orders."""
    from datasets.distributed import split_dataset_by_node

    from ..data.loading import load_xvlm_dataset

    dataset = load_xvlm_dataset(source, "pretrain", split, streaming=True)
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(seed=derive_seed(seed, stream, "shuffle") % 2**32, buffer_size=shuffle_buffer)
    return dataset


class StreamingBatches:
    """Endless batches of ``batch_size`` rows of an iterable dataset, collated with the seeded ``collator``.

    Args:
        dataset: a ``datasets.IterableDataset`` (this process's part; see `open_pretrain_stream`).
        collator: builds a batch from rows (re-seeded per batch, as in the map-style path).
        batch_size: rows per batch.
        seed, stream, rank: the batch seed of step ``s`` is ``derive_seed(seed, stream, "batch", s, rank)``.
        adapter: row -> collator row (e.g. `pretrain_image_text_row`).
        start_step: the index of the first batch (resume).
        position: where to start in the stream (resume); `position` is updated after every batch.

    Raises:
        ValueError: a pass over the stream has fewer than ``batch_size`` rows.
    """

    def __init__(
        self,
        dataset: Any,
        collator: Callable[[Sequence[dict]], Any],
        batch_size: int,
        seed: int,
        stream: str,
        rank: int,
        adapter: Callable[[dict], dict] | None = None,
        start_step: int = 0,
        position: tuple[int, int] = (0, 0),
    ) -> None:
        self.dataset, self.collate, self.batch_size = dataset, SeededCollate(collator), batch_size
        self.seed, self.stream, self.rank, self.adapter = seed, stream, rank, adapter
        self.step, self.position = start_step, StreamPosition(int(position[0]), int(position[1]))
        self._rows: Iterator[dict] | None = None

    def _open(self) -> Iterator[dict]:
        epoch, consumed = self.position
        self.dataset.set_epoch(epoch)
        rows = iter(self.dataset)
        for _ in range(consumed):  # replay to the saved position (the shuffle buffer is part of it)
            if next(rows, None) is None:
                raise ValueError(f"the {self.stream} stream has fewer than the {consumed} examples of its saved "
                                 f"position in pass {epoch}: not the checkpoint's data")
        return rows

    def next_rows(self) -> list[dict]:
        """The next ``batch_size`` rows (adapted), starting a new pass when the stream ends."""
        if self._rows is None:
            self._rows = self._open()
        out: list[dict] = []
        while len(out) < self.batch_size:
            row = next(self._rows, None)
            if row is None:
                if self.position[1] == 0:
                    option = "--region-max-images" if self.stream == "region" else "--batch-size"
                    raise ValueError(f"the {self.stream} stream of process {self.rank} has fewer than "
                                     f"{self.batch_size} examples per pass (one batch): lower {option}")
                # the incomplete last batch of a pass is dropped (official drop_last=True)
                self.position, out = StreamPosition(self.position[0] + 1, 0), []
                self._rows = self._open()
                continue
            out.append(self.adapter(dict(row)) if self.adapter is not None else dict(row))
        self.position = StreamPosition(self.position[0], self.position[1] + len(out))
        return out

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        """The next collated batch (a dict of tensors)."""
        rows = self.next_rows()
        batch = self.collate([(row, derive_seed(self.seed, self.stream, "batch", self.step, self.rank))
                              for row in rows])
        self.step += 1
        return batch
