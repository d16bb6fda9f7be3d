"""Independent references for the official X-VLM caption decoding, written from the algorithms (not from
`modeling_xvlm.official_generation`), for tests/test_modeling_xvlm_captioning.py.

- `beam_search_4125`: transformers 4.12.5 `generate(num_beams>1)` as the official `Captioning.py` calls it
  (`generation_utils.beam_search` + `generation_beam_search.BeamSearchScorer`): every step recomputes the whole
  decoder forward without a cache; candidates are walked one by one per image; every finished hypothesis is kept
  and ranked at the end (4.12.5 keeps the best `num_beams`, the same ranking).
- `greedy_5x`: step-wise argmax with the minimum length (4.12.5 `greedy_search` = transformers 5 greedy).
- `oscar_greedy`: the official `greedy=True` (`xbert.BertLMHeadModel._generate_no_beam_search`, no sampling).

The official captioning forward on an *official-format* state dict (`vision_encoder.*`, `text_decoder.bert.*`,
`text_decoder.cls.*`; tests/test_conversion_captioning.py), built on the functional xbert / Swin of
`official_reference.py` and sharing no code with `modeling_xvlm`:

- `caption_image_states`: `vision_encoder(image)` = `[mean of the patches; patches]` (all-ones image mask).
- `caption_decoder_logits`: `BertLMHeadModel` (is_decoder): self-attention mask `causal[i, j] = j <= i` times the
  padding mask, `(1 - m) * -10000`; layers `>= fusion_layer` cross-attend to the image (`(1 - 1) * -1e9`); the
  LM head (transform dense -> GELU -> LayerNorm -> `cls.predictions.decoder.weight` + `cls.predictions.bias`).
- `caption_targets` / `caption_loss`: `model_captioning.forward` targets (pad -> -100, the first `prompt_length`
  tokens -> -100) and the `BertLMHeadModel` loss on `logits[:, :-1]` vs `targets[:, 1:]`: `LabelSmoothSoftmaxCEV1`
  (one-hot filled with `s / V`, the target set to `1 - s`, `-sum(log_softmax * one_hot)`, ignored tokens 0,
  `sum / n_valid`) when `s > 0`, else `CrossEntropyLoss` (mean over non-ignored).
- `OfficialCaptionDecoder`: the decoder logits as a callable for the decoding references above.
- `official_captions`: `model_captioning.generate`'s `_get_captions` (decode with `skip_special_tokens`, cut
  `len(prompt)` characters).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from official_reference import (
    StateDict,
    TextSpec,
    _layer_norm,
    _linear,
    bert_embeddings,
    bert_layers,
    image_sequence,
    swin_patch_tokens,
)


def _next_log_probs(decoder, ids: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token, `(rows, vocab)`, from a full forward over `ids` (no cache)."""
    logits = decoder(input_ids=ids, encoder_hidden_states=image_states, use_cache=False).logits[:, -1]
    return logits.float().log_softmax(dim=-1)


@torch.no_grad()
def beam_search_4125(
    decoder,
    prompt: torch.Tensor,
    image_states: torch.Tensor,
    *,
    num_beams: int,
    max_length: int,
    min_length: int,
    eos: int,
    pad: int,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    num_return_sequences: int = 1,
    repetition_penalty: float = 1.0,
) -> list[list[tuple[list[int], float]]]:
    """Per image, the `num_return_sequences` best `(tokens, score)`, best first. `tokens` are the returned ids:
    prompt + caption, plus [SEP] when shorter than `max_length` (no padding)."""
    batch = prompt.shape[0]
    ids = prompt.repeat_interleave(num_beams, dim=0)
    states = image_states.repeat_interleave(num_beams, dim=0)
    # The running sums stay fp32, as in 4.12.5 (beam_scores is a float tensor).
    beam_scores = torch.tensor(([0.0] + [-1e9] * (num_beams - 1)) * batch, dtype=torch.float32)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    while True:
        cur_len = ids.shape[1]
        log_probs = _next_log_probs(decoder, ids, states)
        for row in range(ids.shape[0]):  # CTRL penalty, on the log-probabilities in 4.12.5 beam search
            for token in set(ids[row].tolist()):
                value = log_probs[row, token]
                log_probs[row, token] = value * repetition_penalty if value < 0 else value / repetition_penalty
        if cur_len < min_length:
            log_probs[:, eos] = float("-inf")
        totals = log_probs + beam_scores[:, None]
        vocab = totals.shape[1]
        new_scores, new_tokens, new_rows = [], [], []
        for b in range(batch):
            first = b * num_beams
            if done[b]:
                new_scores += [0.0] * num_beams
                new_tokens += [pad] * num_beams
                new_rows += list(range(first, first + num_beams))
                continue
            top_scores, top_index = totals[first : first + num_beams].reshape(-1).topk(2 * num_beams)
            kept = 0
            for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
                beam, token = divmod(index, vocab)
                row = first + beam
                if token == eos:
                    if rank < num_beams:  # a [SEP] outside the top num_beams is dropped
                        finished[b].append((score / cur_len**length_penalty, ids[row].tolist()))
                else:
                    new_scores.append(score)
                    new_tokens.append(token)
                    new_rows.append(row)
                    kept += 1
                if kept == num_beams:
                    break
            best = sorted((s for s, _ in finished[b]), reverse=True)[:num_beams]
            if len(best) == num_beams:
                done[b] = early_stopping or best[-1] >= top_scores[0].item() / cur_len**length_penalty
        beam_scores = torch.tensor(new_scores, dtype=torch.float32)
        ids = torch.cat([ids[torch.tensor(new_rows)], torch.tensor(new_tokens)[:, None]], dim=1)
        if all(done) or ids.shape[1] >= max_length:
            break
    results = []
    for b in range(batch):
        if not done[b]:
            for row in range(b * num_beams, (b + 1) * num_beams):
                finished[b].append((beam_scores[row].item() / ids.shape[1] ** length_penalty, ids[row].tolist()))
        ranked = sorted(finished[b], key=lambda hyp: hyp[0], reverse=True)[:num_return_sequences]
        results.append([(tokens + ([eos] if len(tokens) < max_length else []), score) for score, tokens in ranked])
    return results


@torch.no_grad()
def greedy_5x(decoder, prompt: torch.Tensor, image_states: torch.Tensor, *, max_length: int, min_length: int, eos: int):
    """Per image, the argmax tokens until [SEP] or `max_length` ([SEP] banned below `min_length`)."""
    outputs = []
    for b in range(prompt.shape[0]):
        ids = prompt[b : b + 1]
        while ids.shape[1] < max_length:
            log_probs = _next_log_probs(decoder, ids, image_states[b : b + 1])
            if ids.shape[1] < min_length:
                log_probs[:, eos] = float("-inf")
            token = int(log_probs[0].argmax())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == eos:
                break
        outputs.append(ids[0].tolist())
    return outputs


@torch.no_grad()
def oscar_greedy(decoder, prompt: torch.Tensor, image_states: torch.Tensor, *, max_length: int, eos: int, pad: int):
    """Per image, `max_length` ids: the argmax tokens (no minimum length) until [SEP], then [PAD]; a caption
    still open at `max_length` ends with [SEP] instead of its last token."""
    outputs = []
    for b in range(prompt.shape[0]):
        ids = prompt[b].tolist()
        while len(ids) < max_length:
            token = int(_next_log_probs(decoder, torch.tensor([ids]), image_states[b : b + 1])[0].argmax())
            ids.append(token)
            if token == eos:
                break
        if ids[-1] != eos:
            ids[-1] = eos
        outputs.append(ids + [pad] * (max_length - len(ids)))
    return outputs


# --------------------------------------------------------------------------------------------------------------
# The official captioning forward on an official-format state dict
# --------------------------------------------------------------------------------------------------------------

CAPTION_DECODER = "text_decoder.bert."
CAPTION_HEAD = "text_decoder.cls.predictions."


def caption_image_states(sd: StateDict, image: torch.Tensor, image_res: int, window: int) -> torch.Tensor:
    """Official `vision_encoder(image)`: `(B, 1 + P, vision_width)`, token 0 the mean of the patch tokens."""
    return image_sequence(swin_patch_tokens(sd, image, image_res, window))


def caption_decoder_logits(
    sd: StateDict,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_states: torch.Tensor,
    spec: TextSpec,
) -> torch.Tensor:
    """Official `text_decoder(input_ids, attention_mask, encoder_hidden_states=image_states, ones)` logits
    `(B, L, V)`; `attention_mask` None = all ones (generation)."""
    rows, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(rows, length)
    positions = torch.arange(length)
    causal = (positions[None, :] <= positions[:, None]).to(torch.float32)
    self_atts = causal[None, :, :] * attention_mask[:, None, :].to(torch.float32)
    image_atts = torch.ones(image_states.shape[:2])
    x = bert_embeddings(sd, input_ids, spec, prefix=CAPTION_DECODER)
    x = bert_layers(sd, x, self_atts, range(spec.num_layers), spec, image_states, image_atts, CAPTION_DECODER)
    h = F.gelu(_linear(sd, CAPTION_HEAD + "transform.dense", x))
    h = _layer_norm(sd, CAPTION_HEAD + "transform.LayerNorm", h, spec.eps)
    return F.linear(h, sd[CAPTION_HEAD + "decoder.weight"]) + sd[CAPTION_HEAD + "bias"]


def caption_targets(input_ids: torch.Tensor, prompt_length: int, pad_id: int = 0) -> torch.Tensor:
    """Official `decoder_targets`: pads -> -100, then the first `prompt_length` columns -> -100 (fine-tuning: 4
    for "a picture of "; the domain pre-training masks no prompt)."""
    targets = input_ids.masked_fill(input_ids == pad_id, -100)
    targets[:, :prompt_length] = -100
    return targets


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Official `BertLMHeadModel` loss (reduction 'mean') of `logits[:, :-1]` against `targets[:, 1:]`."""
    scores = logits[:, :-1].reshape(-1, logits.shape[-1])
    labels = targets[:, 1:].reshape(-1)
    if smoothing <= 0:
        return F.cross_entropy(scores, labels, ignore_index=-100)
    scores = scores.float()
    ignore = labels == -100
    n_valid = (~ignore).sum()
    safe = labels.masked_fill(ignore, 0)
    one_hot = torch.full_like(scores, smoothing / scores.shape[1]).scatter(1, safe[:, None], 1.0 - smoothing)
    loss = -(scores.log_softmax(dim=1) * one_hot).sum(dim=1)
    loss[ignore] = 0
    return loss.sum() / n_valid


def caption_forward(
    sd: StateDict,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    spec: TextSpec,
    image_res: int,
    window: int,
    prompt_length: int,
    smoothing: float,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Official `model_captioning.XVLM.forward` (`prompt_length` 4, smoothing 0.1) or
    `model_captioning_pretrain.XVLM.forward` (`prompt_length` 0, smoothing 0) on tokenised captions."""
    states = caption_image_states(sd, image, image_res, window)
    logits = caption_decoder_logits(sd, input_ids, attention_mask, states, spec)
    loss = caption_loss(logits, caption_targets(input_ids, prompt_length, pad_id), smoothing)
    return {"image_states": states, "logits": logits, "loss": loss}


class OfficialCaptionDecoder:
    """`caption_decoder_logits` on `sd` as the decoder the decoding references call:
    `decoder(input_ids=..., encoder_hidden_states=..., use_cache=False).logits`."""

    def __init__(self, sd: StateDict, spec: TextSpec):
        self.sd, self.spec = sd, spec

    def __call__(
        self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor, use_cache: bool = False, **_: object
    ) -> SimpleNamespace:
        return SimpleNamespace(
            logits=caption_decoder_logits(self.sd, input_ids, None, encoder_hidden_states, self.spec)
        )


def official_captions(tokenizer, sequences: torch.Tensor, prompt: str) -> list[str]:
    """Official `_get_captions`: `tokenizer.decode(ids, skip_special_tokens=True)[len(prompt):]` per row."""
    return [tokenizer.decode(row, skip_special_tokens=True)[len(prompt) :] for row in sequences.tolist()]
