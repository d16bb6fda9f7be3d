"""Official X-VLM MLM masking (``TextMaskingGenerator`` of the official `dataset/pretrain_dataset.py`) producing full-length labels."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

__all__ = ["XVLMTextMasker", "mask_token_ids"]


class XVLMTextMasker:
    """Whole-word span masking as in the official ``TextMaskingGenerator``.

    For each text (token list starting with [CLS], padding excluded):

    1. ``n_pred = min(max_masks, max(1, round(len(tokens) * mask_prob)))`` (``len`` counts [CLS]).
    2. Candidate positions ``1 .. len-1`` are shuffled; for each (until ``n_pred`` positions are collected, checked
       at the top of the loop; already-masked positions skipped) take with probability ``skipgram_prb`` a span of
       length ``k ~ U{2..skipgram_size}`` else length 1, expand it to whole WordPiece words (``##`` continuation),
       and add its positions in order, stopping at position 0, past the end or at a special token.
    3. If more than ``n_pred`` positions were collected, shuffle and keep ``n_pred`` (this can cut words).
    4. Each chosen position: 80 % ``[MASK]``, 10 % a uniformly random id in ``[0, vocab_size)`` (special tokens
       included, as officially), 10 % unchanged.

    Random numbers come from a private ``random.Random(seed)``, so a masker built with a seed is deterministic.
    Deviation (documented): special tokens ([SEP], [PAD], ...) are never masked; the official code only protects
    position 0, which differs only for texts that end in [SEP] (captioning with ``add_eos``).

    Args:
        tokenizer: a WordPiece tokenizer (``convert_ids_to_tokens``, ``mask_token_id``, ``all_special_ids``).
        mask_prob, max_masks, skipgram_prb, skipgram_size, mask_whole_word: the official parameters.
        seed: seed of the private RNG (``None``: nondeterministic).
    """

    def __init__(
        self,
        tokenizer,
        mask_prob: float = 0.25,
        max_masks: int = 8,
        skipgram_prb: float = 0.2,
        skipgram_size: int = 3,
        mask_whole_word: bool = True,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
        if max_masks < 1:
            raise ValueError(f"max_masks must be >= 1, got {max_masks}")
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no [MASK] token")
        self.tokenizer = tokenizer
        self.mask_prob = mask_prob
        self.max_masks = max_masks
        self.skipgram_prb = skipgram_prb
        self.skipgram_size = skipgram_size
        self.mask_whole_word = mask_whole_word
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.vocab_size = len(tokenizer)
        self.special_ids = set(int(i) for i in tokenizer.all_special_ids)
        self.rng = random.Random(seed)

    def choose_positions(self, tokens: Sequence[str], special: Sequence[bool]) -> list[int]:
        """Positions to mask for one text (``tokens`` includes [CLS] at 0, no padding)."""
        rng = self.rng
        n = len(tokens)
        if n < 2:
            return []
        n_pred = min(self.max_masks, max(1, int(round(n * self.mask_prob))))
        cand = list(range(1, n))
        rng.shuffle(cand)
        max_cand = n - 1
        masked: dict[int, None] = {}  # insertion-ordered set
        for pos in cand:
            if len(masked) >= n_pred:
                break
            if pos in masked:
                continue
            if self.skipgram_prb > 0 and self.skipgram_size >= 2 and rng.random() < self.skipgram_prb:
                span = rng.randint(2, self.skipgram_size)
            else:
                span = 1
            st, end = pos, pos + span
            if self.mask_whole_word:
                while st > 0 and tokens[st].startswith("##"):
                    st -= 1
                while end < n and tokens[end].startswith("##"):
                    end += 1
            for mp in range(st, end):
                if 0 < mp <= max_cand and not special[mp]:
                    masked[mp] = None
                else:
                    break
        positions = list(masked)
        if len(positions) > n_pred:
            rng.shuffle(positions)
            positions = positions[:n_pred]
        return positions

    def mask_one(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Mask one unpadded id list; returns ``(masked_ids, labels)`` with -100 where not masked."""
        ids = [int(i) for i in ids]
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        special = [i in self.special_ids for i in ids]
        masked_ids = list(ids)
        labels = [-100] * len(ids)
        for pos in self.choose_positions(tokens, special):
            labels[pos] = ids[pos]
            if self.rng.random() < 0.8:
                masked_ids[pos] = self.mask_token_id
            elif self.rng.random() < 0.5:
                masked_ids[pos] = self.rng.randint(0, self.vocab_size - 1)
        return masked_ids, labels

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a padded batch.

        Args:
            input_ids: ``(N, L)`` long, each row ``[CLS] tokens`` then padding.
            attention_mask: ``(N, L)``; 1 for real tokens (default: all ones).

        Returns:
            ``mlm_input_ids`` ``(N, L)`` long and ``mlm_labels`` ``(N, L)`` long (original id at masked positions,
            -100 elsewhere, padding included).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (N, L), got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out_ids = input_ids.clone()
        labels = torch.full_like(input_ids, -100)
        for r in range(input_ids.shape[0]):
            length = int(attention_mask[r].sum())
            m_ids, lab = self.mask_one(input_ids[r, :length].tolist())
            out_ids[r, :length] = torch.tensor(m_ids, dtype=input_ids.dtype)
            labels[r, :length] = torch.tensor(lab, dtype=input_ids.dtype)
        return out_ids, labels


def mask_token_ids(
    tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, seed: int | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot helper: ``XVLMTextMasker(tokenizer, seed=seed, **kwargs)(input_ids, attention_mask)``."""
    return XVLMTextMasker(tokenizer, seed=seed, **kwargs)(input_ids, attention_mask)
