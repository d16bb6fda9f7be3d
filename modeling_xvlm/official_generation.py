"""The official X-VLM caption decoding, which ran on transformers 4.12.5 (`models/model_captioning.py`,
`Captioning.py`): its beam search (4.12.5 `generation_utils.beam_search` with `BeamSearchScorer`) and OSCAR's
greedy decoding (`xbert.BertLMHeadModel._generate_no_beam_search`, the official `greedy=True`).

transformers 5 scores beam hypotheses differently, so reproducing the official captions needs this loop. In 4.12.5:

- a hypothesis finishes when [SEP] is among the top `num_beams` candidates of a step; it scores
  `sum_logprobs / length ** length_penalty` with `length` = prompt + generated tokens *without* the [SEP]
  (transformers 5: generated tokens + [SEP], prompt excluded);
- beams still open at `max_length` are scored over `max_length` (prompt included);
- with `early_stopping=False` an image is done once it holds `num_beams` hypotheses and the worst of them is at
  least `max(candidate scores) / cur_len ** length_penalty`: the best of all `2 * num_beams` candidates ([SEP] ones
  included) over the length *before* the new token, prompt included;
- `min_length` and `max_length` count the prompt; the output appends [SEP] only to sequences shorter than
  `max_length` and pads the batch to its longest sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .modeling_xvlm_text import XVLMTextLMHeadModel

#: The initial score of beams 1.. of an image: the first step expands beam 0 only (4.12.5).
_START_SCORE = -1e9


class BeamHypotheses:
    """The `num_beams` best finished hypotheses of one image (4.12.5 `BeamHypotheses`)."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, tokens: torch.Tensor, sum_logprobs: float) -> None:
        """Add `tokens` `(length,)` (prompt included, no [SEP]) with score `sum_logprobs / length ** lp`."""
        score = sum_logprobs / tokens.shape[-1] ** self.length_penalty
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        """Whether no open beam can still beat the worst kept hypothesis."""
        if len(self) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len**self.length_penalty

    def best(self, n: int) -> list[tuple[float, torch.Tensor]]:
        """The `n` best `(score, tokens)`, best first (4.12.5 order on ties)."""
        ranked = sorted(self.beams, key=lambda beam: beam[0])
        return [ranked.pop() for _ in range(n)]


def step_log_probs(
    logits: torch.Tensor, input_ids: torch.Tensor, min_length: int, eos_token_id: int, repetition_penalty: float
) -> torch.Tensor:
    """`(rows, vocab)` next-token log-probabilities after the 4.12.5 logits processors of the official call: the
    repetition penalty (applied to the log-probabilities, as 4.12.5 beam search does) and the minimum length."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if repetition_penalty != 1.0:
        seen = log_probs.gather(1, input_ids)
        penalised = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        log_probs = log_probs.scatter(1, input_ids, penalised)
    if input_ids.shape[1] < min_length:
        log_probs[:, eos_token_id] = -float("inf")
    return log_probs


def select_beams(
    scores: torch.Tensor,
    tokens: torch.Tensor,
    beams: torch.Tensor,
    input_ids: torch.Tensor,
    hypotheses: list[BeamHypotheses],
    done: list[bool],
    eos_token_id: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 4.12.5 `BeamSearchScorer.process` step.

    Args:
        scores, tokens, beams: `(batch, 2 * num_beams)` the best summed scores of the step, best first, with
            their token and the beam (within the image) they extend.
        input_ids: `(batch * num_beams, cur_len)` the beams before this step.

    Returns:
        `(beam scores, next tokens, source rows)`, each `(batch * num_beams,)`. A [SEP] candidate among the top
        `num_beams` becomes a hypothesis; the first `num_beams` other candidates continue (there are enough: a
        beam has one [SEP] candidate). A finished image keeps its rows and is fed [PAD] with score 0.
    """
    batch, num_beams = scores.shape[0], scores.shape[1] // 2
    rows = beams + torch.arange(batch, device=beams.device)[:, None] * num_beams
    is_eos = tokens == eos_token_id
    keep = (~is_eos).int().argsort(dim=1, descending=True, stable=True)[:, :num_beams]
    next_scores, next_tokens, next_rows = scores.gather(1, keep), tokens.gather(1, keep), rows.gather(1, keep)
    for b in range(batch):
        if done[b]:
            next_scores[b], next_tokens[b] = 0.0, pad_token_id
            next_rows[b] = torch.arange(b * num_beams, (b + 1) * num_beams, device=rows.device)
            continue
        for rank in is_eos[b, :num_beams].nonzero().flatten().tolist():
            hypotheses[b].add(input_ids[rows[b, rank]].clone(), scores[b, rank].item())
        done[b] = hypotheses[b].is_done(scores[b, 0].item(), input_ids.shape[1])
    return next_scores.view(-1), next_tokens.view(-1), next_rows.view(-1)


def finalize_beams(
    input_ids: torch.Tensor,
    beam_scores: torch.Tensor,
    hypotheses: list[BeamHypotheses],
    done: list[bool],
    num_return_sequences: int,
    max_length: int,
    eos_token_id: int,
    pad_token_id: int,
) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """4.12.5 `BeamSearchScorer.finalize`: the open beams of unfinished images become hypotheses; the best
    `num_return_sequences` per image get [SEP] appended when shorter than `max_length`, padded to the longest.
    Returns `(sequences (batch * n, L), scores (batch * n,))`."""
    num_beams = input_ids.shape[0] // len(hypotheses)
    for b, image_hypotheses in enumerate(hypotheses):
        if not done[b]:
            for row in range(b * num_beams, (b + 1) * num_beams):
                image_hypotheses.add(input_ids[row], beam_scores[row].item())
    best = [hyp for image_hypotheses in hypotheses for hyp in image_hypotheses.best(num_return_sequences)]
    width = min(max(tokens.shape[0] for _, tokens in best) + 1, max_length)
    sequences = input_ids.new_full((len(best), width), pad_token_id)
    for i, (_, tokens) in enumerate(best):
        sequences[i, : tokens.shape[0]] = tokens
        if tokens.shape[0] < max_length:
            sequences[i, tokens.shape[0]] = eos_token_id
    scores = torch.tensor([score for score, _ in best], dtype=torch.float32, device=input_ids.device)
    return sequences, scores


class _Decoder:
    """Runs the decoder one step at a time with its KV cache, over `rows` sequences reading `image_states`
    (one per row, or with `image_index` `(rows,)` one per image: row r reads `image_states[image_index[r]]`)."""

    def __init__(
        self,
        decoder: XVLMTextLMHeadModel,
        image_states: torch.Tensor,
        image_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        use_cache: bool = True,
        image_index: torch.Tensor | None = None,
    ):
        self.decoder, self.image_states, self.image_mask = decoder, image_states, image_mask
        self.attention_mask = attention_mask
        self.use_cache = use_cache
        self.image_index = {} if image_index is None else {"encoder_index": image_index}
        self.cache = None

    def next_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`(rows, vocab)` logits after `input_ids` `(rows, L)`; only the new token runs once a cache exists."""
        out = self.decoder(
            input_ids=input_ids if self.cache is None else input_ids[:, -1:],
            attention_mask=self.attention_mask,
            encoder_hidden_states=self.image_states,
            encoder_attention_mask=self.image_mask,
            cache=self.cache,
            use_cache=self.use_cache,
            return_dict=True,
            **self.image_index,
        )
        # None without a cache (use_cache=False, or gradient checkpointing in training mode): full recompute.
        self.cache = out.cache if self.use_cache else None
        return out.logits[:, -1]

    def advance(self, rows: torch.Tensor | None) -> None:
        """After a step: beams continue from `rows` (None: every row continues itself) and one token is added."""
        if self.attention_mask is not None:
            ones = self.attention_mask.new_ones(self.attention_mask.shape[0], 1)
            self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        if rows is not None and self.cache is not None:
            # Only the self-attention cache: the cross-attention keys/values are the same for every beam of an image.
            cache = getattr(self.cache, "self_attention_cache", self.cache)
            cache.reorder_cache(rows)


def _check_lengths(prompt_length: int, max_length: int, num_beams: int, num_return_sequences: int) -> None:
    if max_length <= prompt_length:
        raise ValueError(
            f"max_length ({max_length}) counts the prompt ({prompt_length} tokens) and must exceed it, as in the "
            "official decoding."
        )
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}.")


@torch.no_grad()
def official_beam_search(
    decoder: XVLMTextLMHeadModel,
    input_ids: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    eos_token_id: int,
    pad_token_id: int = 0,
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    use_cache: bool = True,
) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """The 4.12.5 beam search of the official captioner (see the module docstring for the scoring).

    Args:
        decoder: the caption decoder (causal, cross-attending to the image).
        input_ids: `(batch, P)` the prompt (`[CLS] a picture of`, no [SEP]); `attention_mask` `(batch, P)` its mask.
        encoder_hidden_states: `(batch, 1 + patches, vision_width)` one image sequence per prompt;
            `encoder_attention_mask` its key mask (default: all visible, as the official).
        max_length, min_length: total lengths, prompt included (official: 20 and 5).
        use_cache: keep the decoder's KV cache (`False`: recompute every position each step; the same tokens).

    Returns:
        `(sequences, scores)`: `(batch * num_return_sequences, L)` the prompt, the caption and [SEP] (unless cut at
        `max_length`), [PAD] after it; `(batch * num_return_sequences,)` the hypothesis scores.
    """
    batch, prompt_length = input_ids.shape
    if num_beams < 2:
        raise ValueError(f"Beam search needs num_beams >= 2, got {num_beams}.")
    _check_lengths(prompt_length, max_length, num_beams, num_return_sequences)

    def expand(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat_interleave(num_beams, dim=0)

    # The official repeats the image per beam; here the beams of an image read it through an index, so that its
    # cross-attention keys/values are projected once per image (the cache then holds them per beam).
    image_index = torch.arange(batch, device=input_ids.device).repeat_interleave(num_beams)
    steps = _Decoder(
        decoder, encoder_hidden_states, expand(encoder_attention_mask), expand(attention_mask), use_cache, image_index
    )
    ids = expand(input_ids)
    beam_scores = torch.zeros(batch, num_beams, device=ids.device)
    beam_scores[:, 1:] = _START_SCORE
    beam_scores = beam_scores.view(-1)
    hypotheses = [BeamHypotheses(num_beams, length_penalty, early_stopping) for _ in range(batch)]
    done = [False] * batch
    while True:
        log_probs = step_log_probs(steps.next_logits(ids), ids, min_length, eos_token_id, repetition_penalty)
        vocab = log_probs.shape[-1]
        totals = (log_probs + beam_scores[:, None]).view(batch, num_beams * vocab)
        scores, flat = totals.topk(2 * num_beams, dim=1, largest=True, sorted=True)
        beam_scores, tokens, rows = select_beams(
            scores, flat % vocab, flat // vocab, ids, hypotheses, done, eos_token_id, pad_token_id
        )
        ids = torch.cat([ids[rows], tokens[:, None]], dim=1)
        steps.advance(rows)
        if all(done) or ids.shape[1] >= max_length:
            break
    return finalize_beams(
        ids, beam_scores, hypotheses, done, num_return_sequences, max_length, eos_token_id, pad_token_id
    )


@torch.no_grad()
def official_greedy_search(
    decoder: XVLMTextLMHeadModel,
    input_ids: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    eos_token_id: int,
    pad_token_id: int = 0,
    max_length: int = 20,
    repetition_penalty: float = 1.0,
    use_cache: bool = True,
) -> torch.LongTensor:
    """The official `greedy=True` decoding (OSCAR's `_generate_no_beam_search` without sampling; the SCST
    baseline): the argmax token each step, no minimum length, [PAD] after [SEP]; a caption still open at
    `max_length` gets its last token replaced by [SEP]. Returns `(batch, max_length)`, padded with [PAD]."""
    _check_lengths(input_ids.shape[1], max_length, 1, 1)
    steps = _Decoder(decoder, encoder_hidden_states, encoder_attention_mask, attention_mask, use_cache)
    ids = input_ids
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    while ids.shape[1] < max_length:
        logits = steps.next_logits(ids).float()
        if repetition_penalty != 1.0:  # CTRL penalty on the logits, each seen token once
            seen = logits.gather(1, ids)
            logits = logits.scatter(1, ids, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
        tokens = logits.argmax(dim=-1).masked_fill(~unfinished, pad_token_id)
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        steps.advance(None)
        unfinished &= tokens != eos_token_id
        if not bool(unfinished.any()):
            break
    if ids.shape[1] == max_length:
        ids[:, -1] = ids[:, -1].masked_fill(unfinished, eos_token_id)
    return F.pad(ids, (0, max_length - ids.shape[1]), value=pad_token_id)


__all__ = ["BeamHypotheses", "official_beam_search", "official_greedy_search"]
