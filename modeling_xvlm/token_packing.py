"""Padding-free text and fusion layers: the real tokens of a padded batch packed into one `(tokens, width)` matrix.

The position-wise work of a BERT layer (query/key/value/output projections, feed-forward, LayerNorm, dropout) does
not depend on the other positions, so it can run on the real tokens only. Attention still needs the padded
`(batch, heads, length, head_dim)` layout: the attention layers scatter their projections into it (`unpack`) and
gather the output back (`pack`). Real tokens' outputs equal the padded computation (fp32, to rounding); padded
positions come out as 0 (the padded computation gives values that no X-VLM head reads: they are masked as keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedLayout:
    """Where the real tokens of a `(batch, length)` batch sit when packed.

    Attributes:
        index: `(tokens,)` flat positions `b * length + t` of the real tokens, in row order.
        batch: rows of the padded batch.
        length: positions per row.
    """

    index: torch.Tensor
    batch: int
    length: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor | None) -> PackedLayout | None:
        """The layout of a tokenizer's right-padded 0/1 mask `(batch, length)`; `None` where packing does not apply:
        no padding, or a mask that is not ones-then-zeros in every row with [CLS] visible (left padding, holes,
        an empty row), which keeps the padded computation exactly."""
        if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] < 2:
            return None
        visible = attention_mask != 0
        if bool(visible.all()) or not bool(visible[:, 0].all()):
            return None
        if bool((visible[:, 1:] & ~visible[:, :-1]).any()):  # a real token after a padded one
            return None
        return cls(visible.reshape(-1).nonzero().squeeze(1), attention_mask.shape[0], attention_mask.shape[1])

    @property
    def tokens(self) -> int:
        return int(self.index.numel())

    def pack(self, states: torch.Tensor) -> torch.Tensor:
        """`(batch, length, width)` -> `(tokens, width)`."""
        return states.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def unpack(self, states: torch.Tensor) -> torch.Tensor:
        """`(tokens, width)` -> `(batch, length, width)`, zeros at the padded positions."""
        padded = states.new_zeros(self.batch * self.length, states.shape[-1])
        return padded.index_copy(0, self.index, states).view(self.batch, self.length, -1)


def leading_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`(batch,)` padded positions before each row's first real token when `attention_mask` `(batch, length)` is
    left-padded (zeros then ones in every row, some row starting with a zero); `None` otherwise."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] < 2:
        return None
    visible = attention_mask != 0
    if bool(visible[:, 0].all()) or not bool(visible.any(1).all()):
        return None
    if bool((visible[:, :-1] & ~visible[:, 1:]).any()):  # a padded position after a real token
        return None
    return (~visible).sum(1)


def right_align(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-padded texts `(batch, length)` rotated so that each row's real tokens come first (right padding, the
    layout X-VLM's text stack reads: [CLS] at position 0); other inputs are returned as they are."""
    shift = leading_padding(attention_mask)
    if shift is None:
        return input_ids, attention_mask
    length = attention_mask.shape[1]
    order = (torch.arange(length, device=shift.device)[None, :] + shift[:, None]) % length
    return input_ids.gather(1, order), attention_mask.gather(1, order)


__all__ = ["PackedLayout", "leading_padding", "right_align"]
