"""X-VLM for visual question answering (official `models/model_vqa.py`, `VQA.py`).

The question `[CLS] words` (no `[SEP]`) runs through the whole X-VLM text stack with the image (text layers, then
fusion layers). An answer decoder (`XVLMTextLMHeadModel`: causal, every layer cross-attending to the *question
states*, its own embeddings tied to its LM head) reads answers `[CLS] answer [SEP]`. Answers are scored by the
official ranking over a candidate list (`rank_answers`) or generated freely (`generate`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_xvlm import XVLMConfig, XVLMTextConfig
from .modeling_xvlm import XVLMHeadMixin, XVLMModel, XVLMPreTrainedModel, head_kwargs, nested_to_tuple, wants_loss
from .modeling_xvlm_pretraining import XVLMForPretraining
from .losses import IGNORE_INDEX
from .modeling_xvlm_text import XVLMTextLMHeadModel
from .token_packing import leading_padding, right_align

#: Candidates re-scored per question by the official ranking (`k_test` of `configs/VQA.yaml`).
DEFAULT_K_TEST = 128
#: `generate`'s default answer length (`generation_config.max_new_tokens`): VQA answers are a few words.
DEFAULT_MAX_NEW_TOKENS = 10



def vqa_decoder_config(config: XVLMConfig) -> XVLMTextConfig:
    """The answer decoder's config (official `model_vqa.py`): the text config with causal self-attention in
    every layer, cross-attention in every layer (`fusion_layer = 0`) to states of the text width, and
    `config.num_decoder_layers` layers (default: the number of fusion layers)."""
    text = config.text_config
    return text.with_changes(
        is_decoder=True,
        fusion_layer=0,
        num_hidden_layers=config.num_decoder_layers or text.num_fusion_layers,
        encoder_width=text.hidden_size,
        tie_cross_attention_pairs=False,
        use_cache=True,
    )


def decoder_init_state(text_state: dict[str, torch.Tensor], config: XVLMConfig) -> dict[str, torch.Tensor]:
    """The official pre-training -> VQA decoder initialisation from the X-VLM text stack's state dict
    (`XVLMTextModel` keys): fusion layer `N` becomes decoder layer `N - fusion_layer` and the embeddings are
    copied; text layers are dropped, and so are the cross-attention key/value when the decoder's cross-attention
    width (the text width) differs from the vision width. Keys are those of `XVLMTextLMHeadModel`."""
    fusion = config.text_config.fusion_layer
    resized = config.text_config.hidden_size != config.vision_width
    out: dict[str, torch.Tensor] = {}
    for key, value in text_state.items():
        if not key.startswith("encoder.layer."):
            out[f"text_model.{key}"] = value
            continue
        index, rest = key[len("encoder.layer.") :].split(".", 1)
        if int(index) < fusion:
            continue
        if resized and rest.startswith(("crossattention.self.key.", "crossattention.self.value.")):
            continue
        out[f"text_model.encoder.layer.{int(index) - fusion}.{rest}"] = value
    return out


@dataclass
class XVLMForQuestionAnsweringOutput(ModelOutput):
    """Output of `XVLMForQuestionAnswering.forward`.

    Args:
        loss: the official VQA loss, `sum(answer_weights * answer_loss) / num_questions`, when computed.
        answer_loss: `(N,)` per-answer sum of the token negative log-likelihoods.
        logits: `(N, La, vocab)` decoder logits of the answers, when answers are given.
        question_states: `(B, Lq, hidden)` the question's fused states (what the decoder cross-attends to).
        text_model_output: the text stack's output over all layers for the questions.
        vision_model_output: the image encoder's output (`last_hidden_state` `(B, 1 + P, vision_width)`).
    """

    loss: torch.FloatTensor | None = None
    answer_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    question_states: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPastAndCrossAttentions | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return nested_to_tuple(self, ("text_model_output", "vision_model_output"))


@dataclass
class XVLMAnswerRankingOutput(ModelOutput):
    """Output of `XVLMForQuestionAnswering.rank_answers`: the top `k` candidates of each question, best first.

    Args:
        candidate_indices: `(B, k)` indices into the candidate list; column 0 is the answer.
        probabilities: `(B, k)` the softmax of the ranking scores over the k re-scored candidates.
        scores: `(B, k)` the ranking scores (official: `log p(first token) - answer loss`).
    """

    candidate_indices: torch.LongTensor | None = None
    probabilities: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None


class XVLMForQuestionAnswering(XVLMHeadMixin, XVLMPreTrainedModel, GenerationMixin):
    """X-VLM for VQA (official `models/model_vqa.py`): the X-VLM encoder reads the question with the image and an
    answer decoder (`text_decoder`, `vqa_decoder_config`) cross-attends to the question's states.

    Training: `forward` with the answers as `labels` gives the official loss (per-answer summed token NLL, weighted
    by `answer_weights`, summed, divided by the number of questions; `answers_per_question` answers per question).
    Inference: `rank_answers` (the official ranking over a candidate list) or `generate` (free-form answers).
    """

    _no_itc_features = (
        "the official VQA model (`models/model_vqa.py`) is trained without the contrastive loss and has no "
        "`vision_proj` / `text_proj`. `model.xvlm.encode_image(pixel_values)` / `model.xvlm.encode_text(input_ids, "
        "attention_mask)` give the unprojected sequences; ITC features come from a pre-training or retrieval "
        "checkpoint."
    )

    def __init__(self, config: XVLMConfig):
        super().__init__(config)
        self.xvlm = XVLMModel(config, add_projections=False)
        self.text_decoder = XVLMTextLMHeadModel(vqa_decoder_config(config))
        self.post_init()
        # GenerationMixin: `generation_config` is saved (generation_config.json) and read by the generation pipelines.
        self.generation_config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def from_pretraining(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> XVLMForQuestionAnswering:
        """Build the head from a pre-training checkpoint as the official VQA loader does (`model_vqa.py`,
        `load_pretrained`): the encoder takes every layer; the decoder's layer `i` takes fusion layer
        `fusion_layer + i` (self-attention, feed-forward, cross-attention query and output), the embeddings and
        the MLM head; the decoder's cross-attention key/value stay freshly initialised when their input width
        changes (vision width -> text width). New weights are listed in `model.newly_initialized_keys`.

        Args:
            pretrained_model_name_or_path: a saved X-VLM folder / Hub id (a pre-training one carries the MLM
                head; others leave the LM head's transform new), or an X-VLM model instance.
            kwargs: passed to `from_pretrained`.
        """
        source = pretrained_model_name_or_path
        if not isinstance(source, XVLMPreTrainedModel):
            architectures = XVLMConfig.from_pretrained(source, **kwargs).architectures or []
            loader = XVLMForPretraining if "XVLMForPretraining" in architectures else XVLMModel
            source = loader.from_pretrained(source, **kwargs)
        base = source if isinstance(source, XVLMModel) else source.xvlm
        config = base.config
        if config.num_decoder_layers not in (None, config.text_config.num_fusion_layers):
            raise ValueError(
                "The official initialisation copies one fusion layer per decoder layer: num_decoder_layers must "
                f"equal the {config.text_config.num_fusion_layers} fusion layers, got {config.num_decoder_layers}."
            )
        model = cls(config)
        encoder_state = {k: v for k, v in base.state_dict().items() if k in model.xvlm.state_dict()}
        model.xvlm.load_state_dict(encoder_state, strict=False)
        decoder_state = decoder_init_state(base.text_model.state_dict(), config)
        if getattr(source, "mlm_head", None) is not None:
            decoder_state.update({f"lm_head.{k}": v for k, v in source.mlm_head.state_dict().items()})
        missing, unexpected = model.text_decoder.load_state_dict(decoder_state, strict=False)
        if unexpected:
            raise ValueError(f"Unexpected decoder keys from the pre-training checkpoint: {unexpected}.")
        tied = set(model.text_decoder.all_tied_weights_keys)
        new = [f"text_decoder.{k}" for k in missing if k not in tied]
        new += [f"xvlm.{k}" for k in model.xvlm.state_dict() if k not in encoder_state]
        model.newly_initialized_keys = sorted(new)
        return model

    # -- encoder and decoder ------------------------------------------------------------------------------------
    def encode_questions(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[BaseModelOutputWithPastAndCrossAttentions, BaseModelOutputWithPooling]:
        """`(question output, image output)`: the questions `(B, Lq)` through the whole text stack with their
        images `(B, 3, H, W)`; `question output.last_hidden_state` is `(B, Lq, hidden)`."""
        if leading_padding(attention_mask) is not None:
            raise ValueError(
                "The questions are left-padded: X-VLM's text stack reads [CLS] at position 0 and absolute positions "
                "from it. Pad on the right (tokenizer.padding_side = 'right', as XVLMProcessor does)."
            )
        image = self.xvlm.encode_image(pixel_values, **kwargs)
        if image.last_hidden_state.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Got {image.last_hidden_state.shape[0]} images for {input_ids.shape[0]} questions.")
        question = self.xvlm.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image.last_hidden_state,
            return_dict=True,
            **kwargs,
        )
        return question, image

    def decode_answers(
        self,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        answers_per_question: torch.Tensor | int,
        answer_input_ids: torch.LongTensor,
        answer_attention_mask: torch.Tensor | None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The decoder on answers `(N, La)`, question b's `answers_per_question[b]` answers consecutive (an int: as
        many for every question), cross-attending to the question states `(B, Lq, hidden)` with mask `(B, Lq)`;
        with `labels` the per-answer summed token NLL as `loss` `(N,)`."""
        return self.text_decoder(
            input_ids=answer_input_ids,
            attention_mask=answer_attention_mask,
            encoder_hidden_states=question_states.repeat_interleave(answers_per_question, dim=0),
            encoder_attention_mask=question_mask.repeat_interleave(answers_per_question, dim=0),
            labels=labels,
            reduction="none",
            use_cache=False,
            return_dict=True,
            **kwargs,
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        answer_weights: torch.Tensor | None = None,
        answers_per_question: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Any,
    ) -> XVLMForQuestionAnsweringOutput:
        """Encode the questions and, when answers are given, decode them.

        Args:
            pixel_values: `(B, 3, H, W)`, one image per question.
            input_ids, attention_mask: `(B, Lq)` questions (`[CLS] words`, no `[SEP]`, as the official VQA), padded on
                the right (left padding: `ValueError`; `generate` and `rank_answers` take either side).
            labels: `(N, La)` answers `[CLS] answer [SEP]`, padding as -100 (or the pad id): the targets of the
                loss; `decoder_input_ids` default to them (-100 -> pad id).
            decoder_input_ids, decoder_attention_mask: `(N, La)` the decoder's input (default: from `labels`).
            answer_weights: `(N,)` the weight of each answer in the loss (default 1).
            answers_per_question: `(B,)` how many consecutive answers belong to each question (default: one each).
            return_loss: `None` (default): a loss iff `labels` are given; `True` / `False` force it.
        """
        kwargs = head_kwargs(self, kwargs, pixel_values, input_ids)
        compute_loss = wants_loss(return_loss, labels)
        if compute_loss and labels is None:
            raise ValueError("XVLMForQuestionAnswering needs the answers as labels to compute a loss.")
        question, image = self.encode_questions(pixel_values, input_ids, attention_mask, **kwargs)
        states = question.last_hidden_state
        output = XVLMForQuestionAnsweringOutput(
            question_states=states, text_model_output=question, vision_model_output=image
        )
        if labels is None and decoder_input_ids is None:
            return output
        decoder_input_ids, decoder_attention_mask, labels = self._decoder_inputs(
            decoder_input_ids, decoder_attention_mask, labels
        )
        counts = self._answer_counts(answers_per_question, states.shape[0], decoder_input_ids.shape[0])
        question_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        decoded = self.decode_answers(
            states, question_mask, counts, decoder_input_ids, decoder_attention_mask, labels=labels, **kwargs
        )
        output.logits = decoded.logits
        if labels is not None:
            output.answer_loss = decoded.loss
        if compute_loss:
            weights = self._answer_weights(answer_weights, decoded.loss)
            output.loss = (weights * decoded.loss).sum() / states.shape[0]
        return output

    # -- answer inputs ------------------------------------------------------------------------------------------
    def _decoder_inputs(
        self,
        decoder_input_ids: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if labels is not None:
            labels = torch.as_tensor(labels).long()
            if labels.dim() != 2:
                raise ValueError(f"labels must be answer token ids of shape (num_answers, La), got {tuple(labels.shape)}.")
            # The official targets: the answer ids with padding as -100.
            labels = labels.masked_fill(labels == self.config.text_config.pad_id, IGNORE_INDEX)
        if decoder_input_ids is None:
            decoder_input_ids = labels.masked_fill(labels == IGNORE_INDEX, self.config.text_config.pad_id)
            if decoder_attention_mask is None:
                decoder_attention_mask = (labels != IGNORE_INDEX).long()
        elif labels is not None and tuple(labels.shape) != tuple(decoder_input_ids.shape):
            raise ValueError(
                f"labels {tuple(labels.shape)} and decoder_input_ids {tuple(decoder_input_ids.shape)} differ in shape."
            )
        return decoder_input_ids, decoder_attention_mask, labels

    @staticmethod
    def _answer_counts(counts: Any, num_questions: int, num_answers: int) -> torch.Tensor:
        if counts is None:
            if num_answers != num_questions:
                raise ValueError(
                    f"Got {num_answers} answers for {num_questions} questions: pass answers_per_question (B,) to say "
                    "how many consecutive answers belong to each question."
                )
            return torch.ones(num_questions, dtype=torch.long)
        counts = torch.as_tensor(counts).long().view(-1).cpu()
        if counts.shape[0] != num_questions or bool((counts < 0).any()) or int(counts.sum()) != num_answers:
            raise ValueError(
                f"answers_per_question must have {num_questions} non-negative entries summing to the {num_answers} "
                f"answers, got {counts.tolist()}."
            )
        return counts

    @staticmethod
    def _answer_weights(weights: Any, answer_loss: torch.Tensor) -> torch.Tensor:
        if weights is None:
            return torch.ones_like(answer_loss)
        weights = torch.as_tensor(weights, dtype=answer_loss.dtype, device=answer_loss.device).view(-1)
        if weights.shape != answer_loss.shape:
            raise ValueError(f"answer_weights must have shape ({answer_loss.shape[0]},), got {tuple(weights.shape)}.")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("answer_weights must be finite.")
        return weights

    # -- ranking ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rank_answers(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        answer_input_ids: torch.LongTensor,
        answer_attention_mask: torch.Tensor | None = None,
        k: int = DEFAULT_K_TEST,
        official_answer_scoring: bool | None = None,
        reuse_first_step: bool = True,
    ) -> XVLMAnswerRankingOutput:
        """The official answer ranking (`model_vqa.rank_answer`) of every question over one candidate list.

        1. The decoder reads `[CLS]` alone; the probability of each candidate's first token gives its first-stage
           score and the top `k` go on (a candidate outside them cannot win).
        2. Those `k` are decoded with teacher forcing; score = `log p(first token) - answer loss` (official: the
           first token counts twice) or `-answer loss` (`official_answer_scoring=False`; default: the config's).
        3. Softmax over the `k` scores, sorted.

        Args:
            pixel_values, input_ids, attention_mask: `(B, 3, H, W)` images and `(B, Lq)` questions (padded on either
                side).
            answer_input_ids, answer_attention_mask: `(C, La)` the candidates `[CLS] answer [SEP]`, tokenised once
                (`XVLMProcessor.encode_answers`) and reused for every batch.
            k: candidates re-scored per question (official `k_test`: 128), at most `C`.
            reuse_first_step: decode the `k` candidates from the first stage's KV cache (the `[CLS]` step and the
                question's cross-attention keys/values, computed once per question instead of once per candidate),
                grouped by length so that no padding is decoded; `False` decodes every candidate from `[CLS]` with
                the question states tiled `k` times, as the official code does. Same rankings, scores equal within
                float rounding (tests: 1e-5); benchmark 7 of docs/benchmarks.md times both.

        Returns:
            `XVLMAnswerRankingOutput` with `candidate_indices`, `probabilities` and `scores`, `(B, min(k, C))`.
        """
        input_ids, attention_mask = right_align(input_ids, attention_mask)  # scores only: any padding side
        question, _ = self.encode_questions(pixel_values, input_ids, attention_mask)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return self.rank_candidates(
            question.last_hidden_state,
            mask,
            answer_input_ids,
            answer_attention_mask,
            k,
            official_answer_scoring,
            reuse_first_step,
        )

    @torch.no_grad()
    def rank_candidates(
        self,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        answer_input_ids: torch.LongTensor,
        answer_attention_mask: torch.Tensor | None = None,
        k: int = DEFAULT_K_TEST,
        official_answer_scoring: bool | None = None,
        reuse_first_step: bool = True,
    ) -> XVLMAnswerRankingOutput:
        """`rank_answers` from already encoded questions `(B, Lq, hidden)` and their mask `(B, Lq)`."""
        self._check_candidates(answer_input_ids, answer_attention_mask)
        official = self.config.official_answer_scoring if official_answer_scoring is None else official_answer_scoring
        k = min(int(k), answer_input_ids.shape[0])
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        first_logits, cache = self._first_step(question_states, question_mask, answer_input_ids, reuse_first_step)
        first_ids = answer_input_ids[:, 1]
        top_probs, top_ids = first_logits.softmax(-1).index_select(1, first_ids).topk(k, dim=1)
        if cache is None:  # the official order (or no cache: gradient checkpointing in training mode)
            answer_loss = self.candidate_losses(
                question_states, question_mask, answer_input_ids, answer_attention_mask, top_ids
            )
        else:
            first_nll = -first_logits.log_softmax(-1).gather(1, first_ids[top_ids])
            later_nll = self._continuation_losses(cache, question_mask, answer_input_ids, answer_attention_mask, top_ids)
            answer_loss = first_nll.flatten() + later_nll
        scores = -answer_loss.view(top_ids.shape)
        if official:
            scores = scores + top_probs.log()
        probabilities, order = F.softmax(scores, dim=-1).topk(k, dim=1)
        return XVLMAnswerRankingOutput(
            candidate_indices=top_ids.gather(1, order), probabilities=probabilities, scores=scores.gather(1, order)
        )

    def first_token_probabilities(
        self, question_states: torch.Tensor, question_mask: torch.Tensor, answer_input_ids: torch.LongTensor
    ) -> torch.Tensor:
        """`(B, C)` the probability of each candidate's first answer token after `[CLS]` (one decoder step)."""
        logits, _ = self._first_step(question_states, question_mask, answer_input_ids, use_cache=False)
        return F.softmax(logits, dim=-1).index_select(1, answer_input_ids[:, 1])

    def _first_step(
        self,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        answer_input_ids: torch.LongTensor,
        use_cache: bool,
    ) -> tuple[torch.Tensor, Any]:
        """`(B, vocab)` fp32 logits of the decoder on `[CLS]` alone, and its KV cache when `use_cache`."""
        start = answer_input_ids[0, 0].repeat(question_states.shape[0], 1)
        out = self.text_decoder(
            input_ids=start,
            encoder_hidden_states=question_states,
            encoder_attention_mask=question_mask,
            use_cache=use_cache,
            return_dict=True,
        )
        return out.logits[:, 0].float(), out.cache

    def _continuation_losses(
        self,
        first_step_cache: Any,
        question_mask: torch.Tensor,
        answer_input_ids: torch.LongTensor,
        answer_attention_mask: torch.Tensor | None,
        candidate_ids: torch.LongTensor,
    ) -> torch.Tensor:
        """`(B * k,)` summed NLL of the candidates' tokens after the first one, decoded from the `[CLS]` step's
        KV cache (its self-attention entry and the question's cross-attention keys/values).

        Candidates are decoded in groups of one length, each without padding and without its last token (which
        predicts nothing): an answer of `n` word pieces costs `n` decoder positions, not the list's padded width.
        """
        k = candidate_ids.shape[1]
        ids = answer_input_ids[candidate_ids.flatten()]
        pad = self.config.text_config.pad_id
        real = (ids != pad) if answer_attention_mask is None else answer_attention_mask[candidate_ids.flatten()].bool()
        lengths = real.sum(dim=1)
        losses = torch.zeros(ids.shape[0], dtype=torch.float, device=ids.device)
        for length in lengths.unique().tolist():
            if length < 3:  # `[CLS] token`: the first step predicted all there is
                continue
            rows = (lengths == length).nonzero().flatten()
            questions = rows // k
            cache = copy.deepcopy(first_step_cache)
            cache.batch_select_indices(questions)
            hidden = self.text_decoder.text_model(
                input_ids=ids[rows, 1 : length - 1],
                encoder_attention_mask=question_mask[questions],
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            targets = ids[rows, 2:length]
            logits = self.text_decoder.lm_head(hidden).float()
            token_nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
            losses[rows] = (token_nll * (targets != pad)).sum(dim=1)
        return losses

    def candidate_losses(
        self,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        answer_input_ids: torch.LongTensor,
        answer_attention_mask: torch.Tensor | None,
        candidate_ids: torch.LongTensor,
    ) -> torch.Tensor:
        """`(B * k,)` summed answer NLL of candidates `candidate_ids` `(B, k)`, question-major."""
        k = candidate_ids.shape[1]
        ids = answer_input_ids[candidate_ids.flatten()]
        mask = None if answer_attention_mask is None else answer_attention_mask[candidate_ids.flatten()]
        targets = ids.masked_fill(ids == self.config.text_config.pad_id, IGNORE_INDEX)
        return self.decode_answers(question_states, question_mask, k, ids, mask, labels=targets).loss

    def _check_candidates(self, answer_input_ids: torch.Tensor, answer_attention_mask: torch.Tensor | None) -> None:
        if answer_input_ids.dim() != 2 or answer_input_ids.shape[1] < 2:
            raise ValueError(
                "answer_input_ids must be the tokenised candidates ([CLS] answer [SEP]) of shape (C, La >= 2), got "
                f"{tuple(answer_input_ids.shape)}: encode them with XVLMProcessor.encode_answers."
            )
        if answer_attention_mask is not None and answer_attention_mask.shape != answer_input_ids.shape:
            raise ValueError(
                f"answer_attention_mask {tuple(answer_attention_mask.shape)} does not match answer_input_ids "
                f"{tuple(answer_input_ids.shape)}."
            )
        if not bool((answer_input_ids[:, 0] == answer_input_ids[0, 0]).all()):
            raise ValueError("Every candidate must start with the same token ([CLS]), as the ranking decodes from it.")

    # -- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """Free-form answers: the decoder generates from `[CLS]` (`text_config.bos_token_id`) until `[SEP]`
        (`eos_token_id`) with transformers' `generate` (greedy by default; `num_beams`, `max_new_tokens`, sampling
        and the KV cache as for any decoder; defaults from `self.generation_config`: `max_new_tokens` 10). The
        questions `(B, Lq)` may be padded on either side (transformers' pipeline pads on the left). Returns
        `(B * num_return_sequences, La)` token ids starting with `[CLS]`;
        `XVLMProcessor.batch_decode(..., skip_special_tokens=True)` gives the answer strings."""
        bos, eos = self.config.text_config.bos_token_id, self.config.text_config.eos_token_id
        if bos is None or eos is None:
            raise ValueError(
                "generate needs text_config.bos_token_id and eos_token_id (the tokenizer's [CLS] and [SEP] ids): set "
                "them, e.g. model.config.text_config.bos_token_id = tokenizer.cls_token_id."
            )
        # transformers' image-text-to-text pipeline pads a batch of questions on the left
        input_ids, attention_mask = right_align(input_ids, attention_mask)
        question, _ = self.encode_questions(pixel_values, input_ids, attention_mask)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        start = torch.full((input_ids.shape[0], 1), bos, dtype=torch.long, device=input_ids.device)
        options = {}
        if "generation_config" not in generate_kwargs:  # the head's settings apply (the decoder's own do not)
            diff = self.generation_config.to_diff_dict()
            options = {k: v for k, v in diff.items() if not k.startswith("_") and k != "transformers_version"}
        options.update(eos_token_id=eos, pad_token_id=self.config.text_config.pad_id, bos_token_id=bos)
        options.update(generate_kwargs)
        return self.text_decoder.generate(
            input_ids=start,
            encoder_hidden_states=question.last_hidden_state,
            encoder_attention_mask=mask,
            **options,
        )


__all__ = [
    "DEFAULT_K_TEST",
    "DEFAULT_MAX_NEW_TOKENS",
    "XVLMAnswerRankingOutput",
    "XVLMForQuestionAnswering",
    "XVLMForQuestionAnsweringOutput",
    "decoder_init_state",
    "vqa_decoder_config",
]
