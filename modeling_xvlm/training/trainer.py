"""``transformers.Trainer`` for this package's collators.

The collators read raw dataset columns (``image``, ``caption``, ``bbox``, ...) that are no arguments of the models'
``forward``. ``Trainer``'s default ``remove_unused_columns=True`` removes exactly those before the collator sees a
row (a plain ``Trainer`` then fails at the first batch, with the setting to change); :class:`XVLMTrainer` keeps the
columns its collators name in ``input_columns`` and removes the others as usual. It also evaluates with the
collator's evaluation counterpart (``for_evaluation()``: no random crop, flip or RandAugment), since ``Trainer``
uses one ``data_collator`` for training and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from torch.utils.data import DataLoader, Dataset
from transformers import Trainer

__all__ = ["XVLMTrainer", "evaluation_collator"]


def evaluation_collator(collator: Callable | None) -> Callable | None:
    """The collator for evaluation batches: ``collator.for_evaluation()`` when it has one, else ``collator``."""
    for_evaluation = getattr(collator, "for_evaluation", None)
    return for_evaluation() if callable(for_evaluation) else collator


class XVLMTrainer(Trainer):
    """``transformers.Trainer`` that works with the X-VLM collators under the default ``TrainingArguments``.

    * The columns the collators read (their ``input_columns``) are kept by ``remove_unused_columns=True``; other
      columns that the model's ``forward`` does not take are still removed.
    * Evaluation and prediction batches come from ``eval_data_collator`` (default:
      ``data_collator.for_evaluation()``, see :func:`evaluation_collator`), training batches from ``data_collator``.

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        eval_data_collator: the collator of ``evaluate`` / ``predict``.
    """

    def __init__(self, *args: Any, eval_data_collator: Callable | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_data_collator = (
            eval_data_collator if eval_data_collator is not None else evaluation_collator(self.data_collator)
        )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for collator in (self.data_collator, getattr(self, "eval_data_collator", None)):
            for column in getattr(collator, "input_columns", ()):
                if column not in self._signature_columns:
                    self._signature_columns.append(column)

    @contextmanager
    def _collating_with(self, collator: Callable | None):
        train_collator = self.data_collator
        self.data_collator = collator
        try:
            yield
        finally:
            self.data_collator = train_collator

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        with self._collating_with(self.eval_data_collator):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        with self._collating_with(self.eval_data_collator):
            return super().get_test_dataloader(test_dataset)
