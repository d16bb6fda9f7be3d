"""X-VLM for image captioning (official `models/model_captioning.py`, `Captioning.py`, `configs/Captioning.yaml`).

The official captioner has no text encoder: the X-VLM text stack becomes a causal decoder (`text_decoder`, an
`XVLMTextLMHeadModel`: every layer causal, the layers from `fusion_layer` on cross-attending to the image sequence
`[mean patch; patches]`, its LM head the pre-training MLM head tied to its word embeddings). Captions are
`[CLS] a picture of caption [SEP]`; the prompt is excluded from the loss (fine-tuning, with label smoothing 0.1)
and starts generation (4.12.5 beam search by default: 3 beams, total lengths 5 to 20).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, SwinModel
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_xvlm import XVLMConfig, XVLMTextConfig
from .losses import IGNORE_INDEX
from .modeling_xvlm import (
    XVLMFeaturesMixin,
    XVLMModel,
    XVLMPreTrainedModel,
    head_kwargs,
    nested_to_tuple,
    shrink_swin_windows,
    use_xvlm_swin_attention,
    wants_loss,
)
from .modeling_xvlm_pretraining import XVLMForPretraining
from .modeling_xvlm_text import XVLMTextLMHeadModel, next_token_loss
from .official_generation import official_beam_search, official_greedy_search

#: Label smoothing of the caption loss in fine-tuning (`label_smoothing` of `configs/Captioning.yaml`); the
#: captioning domain pre-training uses none (`label_smoothing=0.0`).
DEFAULT_LABEL_SMOOTHING = 0.1
#: The official prompt (`prompt` of `configs/Captioning.yaml`): `[CLS] a picture of` (4 tokens) starts every caption.
CAPTION_PROMPT = "a picture of "
#: Official decoding (`configs/Captioning.yaml`): beams, and total lengths counting the prompt.
DEFAULT_NUM_BEAMS = 3
DEFAULT_MAX_LENGTH = 20
DEFAULT_MIN_LENGTH = 5

#: `generate` options the official beam search and greedy decoding understand (others need the stock decoding).
_OFFICIAL_OPTIONS = {
    "num_beams", "max_length", "max_new_tokens", "min_length", "length_penalty", "early_stopping",
    "repetition_penalty", "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id", "use_cache",
    "do_sample", "return_dict_in_generate", "output_attentions", "output_hidden_states",
}


def captioning_decoder_config(config: XVLMConfig) -> XVLMTextConfig:
    """The caption decoder's config (official `model_captioning.py`: `BertLMHeadModel` on the text encoder's
    config): the text config with causal self-attention in every layer; the same `fusion_layer`, layers and
    cross-attention width (the vision width)."""
    return config.text_config.with_changes(is_decoder=True, tie_cross_attention_pairs=False, use_cache=True)


def caption_labels(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    prompt_length: int = 0,
    pad_token_id: int = 0,
) -> torch.LongTensor:
    """The official targets `(B, L)`: the caption ids `[CLS] prompt caption [SEP]` with padding and the first
    `prompt_length` tokens set to -100 (official fine-tuning: the prompt's tokens without [SEP], 4 for
    `"a picture of "`; domain pre-training: 0)."""
    labels = input_ids.masked_fill(input_ids == pad_token_id, IGNORE_INDEX)
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :prompt_length] = IGNORE_INDEX
    return labels


def label_smoothed_next_token_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The official smoothed caption loss (`xbert.LabelSmoothSoftmaxCEV1`) of `logits[:, :-1]` `(B, L-1, V)`
    against `labels[:, 1:]` (-100 ignored), averaged over the labelled tokens, in fp32.

    The target class has weight `1 - smoothing` and every other class `smoothing / V`. (torch's
    `cross_entropy(label_smoothing=s)` gives the target `1 - s + s / V`: it differs by `s / V` target NLL.)
    """
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    target_nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    others_nll = -log_probs.sum(dim=-1) - target_nll
    per_token = (1.0 - smoothing) * target_nll + smoothing / log_probs.shape[-1] * others_nll
    return (per_token * valid).sum() / valid.sum().clamp(min=1)


def captioning_init_state(source_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official pre-training -> captioning initialisation (`model_captioning.load_pretrained`: every
    `text_encoder.*` becomes `text_decoder.*`) on X-VLM keys: `xvlm.vision_model.*` -> `vision_model.*`,
    `xvlm.text_model.*` (all layers, embeddings) -> `text_decoder.text_model.*`, `mlm_head.*` ->
    `text_decoder.lm_head.*`. `source_state` is an `XVLMForPretraining` / head state dict (`xvlm.` keys) or an
    `XVLMModel` one; projections, temperature and other heads are dropped."""
    renames = {
        "vision_model.": "vision_model.",
        "text_model.": "text_decoder.text_model.",
        "mlm_head.": "text_decoder.lm_head.",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in source_state.items():
        name = key.removeprefix("xvlm.")
        for old, new in renames.items():
            if name.startswith(old):
                out[new + name[len(old) :]] = value
    return out


@dataclass
class XVLMForConditionalGenerationOutput(ModelOutput):
    """Output of `XVLMForConditionalGeneration.forward`.

    Args:
        loss: the caption loss (mean over labelled tokens, label-smoothed as configured), when computed.
        logits: `(B, L, vocab)` the decoder's next-token logits at every position.
        image_embeds: `(B, 1 + P, vision_width)` the image sequence the decoder cross-attends to.
        hidden_states, attentions, cross_attentions: the decoder's, with `output_hidden_states` / `output_attentions`.
        vision_model_output: the image encoder's output (Swin hidden states / attentions when asked for).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return nested_to_tuple(self, ("vision_model_output",))


class XVLMForConditionalGeneration(XVLMFeaturesMixin, XVLMPreTrainedModel, GenerationMixin):
    """X-VLM image captioning (official `models/model_captioning.py`): the X-VLM image encoder (`vision_model`)
    and a causal caption decoder (`text_decoder`, `captioning_decoder_config`) cross-attending to the image.

    There is no text encoder (the official model sets it to None): the checkpoint holds `vision_model.*` and
    `text_decoder.*` only. Training: `forward` with `labels` (`caption_labels`: prompt and padding -100).
    Inference: `generate` from the prompt `[CLS] a picture of` (`input_ids`), official 4.12.5 beam search by default.
    """

    # The image side of `XVLMModel`, the same code: `encode_image` gives `[mean patch; patches]` after Swin.
    encode_image = XVLMModel.encode_image
    _check_pixel_values = XVLMModel._check_pixel_values
    _no_itc_features = (
        "the official captioning model (`models/model_captioning.py`) has no text encoder and no `vision_proj` / "
        "`text_proj` (it is trained with the caption loss only). `model.encode_image(pixel_values)` gives the "
        "unprojected image sequence; ITC features come from a pre-training or retrieval checkpoint."
    )

    def __init__(self, config: XVLMConfig):
        super().__init__(config)
        self.vision_model = SwinModel(config.vision_config, add_pooling_layer=False)
        shrink_swin_windows(self.vision_model, config.vision_config)
        use_xvlm_swin_attention(self.vision_model)
        self.text_decoder = XVLMTextLMHeadModel(captioning_decoder_config(config))
        self.post_init()
        # GenerationMixin: saved as generation_config.json; the official decoding settings.
        self.generation_config.num_beams = DEFAULT_NUM_BEAMS
        self.generation_config.max_length = DEFAULT_MAX_LENGTH
        self.generation_config.min_length = DEFAULT_MIN_LENGTH

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.text_decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.text_decoder.set_output_embeddings(new_embeddings)

    @classmethod
    def from_pretraining(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> XVLMForConditionalGeneration:
        """Build the captioner from a pre-training checkpoint as the official loader does
        (`model_captioning.load_pretrained`, `captioning_init_state`): Swin as is; the whole text stack (text and
        fusion layers, embeddings) and the MLM head become the decoder and its LM head. The decoder's
        parameters are the same as the stack's, only run causally. New weights (the LM head's transform and bias
        when the source has no MLM head) are listed in `model.newly_initialized_keys`.

        Args:
            pretrained_model_name_or_path: a saved X-VLM folder / Hub id (a pre-training one carries the MLM head),
                or an X-VLM model instance.
            kwargs: passed to `from_pretrained`.
        """
        source = pretrained_model_name_or_path
        architectures = [type(source).__name__]
        if not isinstance(source, XVLMPreTrainedModel):
            architectures = XVLMConfig.from_pretrained(source, **kwargs).architectures or []
        if cls.__name__ in architectures:
            raise ValueError(f"{source!r} is already a captioning model: load it with {cls.__name__}.from_pretrained.")
        if not isinstance(source, XVLMPreTrainedModel):
            loader = XVLMForPretraining if "XVLMForPretraining" in architectures else XVLMModel
            source = loader.from_pretrained(source, **kwargs)
        model = cls(source.config)
        state = captioning_init_state(source.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"Unexpected captioning keys from the pre-training checkpoint: {unexpected}.")
        tied = set(model.all_tied_weights_keys)
        model.newly_initialized_keys = sorted(k for k in missing if k not in tied and not k.endswith("position_ids"))
        return model

    # -- training -----------------------------------------------------------------------------------------------
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        smoothing: float | None = None,
        **kwargs: Any,
    ) -> XVLMForConditionalGenerationOutput:
        """Decode the captions `(B, L)` with their images `(B, 3, H, W)` (teacher forcing).

        Args:
            input_ids, attention_mask: `(B, L)` captions `[CLS] prompt caption [SEP]`, padded.
            labels: `(B, L)` the targets (`caption_labels`: padding and prompt -100; pad ids count as padding).
                The loss is the next-token cross-entropy of `logits[:, :-1]` against `labels[:, 1:]`, averaged
                over the labelled tokens.
            return_loss: `None` (default): a loss iff `labels` are given; `True` without labels uses `input_ids`
                with padding excluded (the domain pre-training target); `False`: no loss.
            smoothing: the label smoothing, official formula (target `1 - s`, other classes `s / vocab`); default
                `config.label_smoothing` if set, else 0.1 (fine-tuning). The domain pre-training uses 0. (Not named
                `label_smoothing`: `Trainer` takes every forward argument with "label" in its name for a label.)
        """
        kwargs = head_kwargs(self, kwargs, pixel_values, input_ids)
        compute_loss = wants_loss(return_loss, labels)
        image = self.encode_image(pixel_values, **kwargs)
        image_embeds = image.last_hidden_state
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Got {image_embeds.shape[0]} images for {input_ids.shape[0]} captions.")
        decoded = self.text_decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
        loss = None
        if compute_loss:
            targets = self._targets(labels, input_ids, attention_mask)
            loss = self.caption_loss(decoded.logits, targets, smoothing)
        return XVLMForConditionalGenerationOutput(
            loss=loss,
            logits=decoded.logits,
            image_embeds=image_embeds,
            hidden_states=decoded.hidden_states,
            attentions=decoded.attentions,
            cross_attentions=decoded.cross_attentions,
            vision_model_output=image,
        )

    def caption_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float | None = None
    ) -> torch.Tensor:
        """The official caption loss of `logits` `(B, L, V)` against `labels` `(B, L)` (-100 ignored)."""
        smoothing = self._label_smoothing(label_smoothing)
        if smoothing == 0.0:
            return next_token_loss(logits, labels)
        return label_smoothed_next_token_loss(logits, labels, smoothing)

    def _label_smoothing(self, label_smoothing: float | None) -> float:
        if label_smoothing is None:
            label_smoothing = self.config.label_smoothing
        smoothing = DEFAULT_LABEL_SMOOTHING if label_smoothing is None else float(label_smoothing)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {smoothing}.")
        return smoothing

    def _targets(
        self, labels: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if labels is None:
            return caption_labels(input_ids, attention_mask, pad_token_id=self.config.text_config.pad_id)
        labels = torch.as_tensor(labels, device=input_ids.device).long()
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)} (the caption ids with prompt and "
                f"padding as -100, see caption_labels), got {tuple(labels.shape)}."
            )
        return labels.masked_fill(labels == self.config.text_config.pad_id, IGNORE_INDEX)

    # -- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        official_beam_scoring: bool = True,
        official_greedy: bool = False,
        **generate_kwargs: Any,
    ) -> torch.LongTensor | GenerateBeamDecoderOnlyOutput:
        """Caption the images `(B, 3, H, W)`, continuing the prompt `input_ids` `(B, P)`.

        Args:
            input_ids, attention_mask: the prompt without [SEP] (official: `[CLS] a picture of`, `CAPTION_PROMPT`);
                a trailing [SEP] column is dropped. Default `[CLS]` alone (`text_config.bos_token_id`): the
                domain pre-training's captions have no prompt.
            official_beam_scoring: `True` (default): beam search (`num_beams > 1`, no sampling) is the official
                transformers-4.12.5 one (`official_beam_search`), which scores hypotheses over prompt + caption
                without [SEP]; `False`: transformers' own `generate` (5.x scoring, every option).
            official_greedy: the official `greedy=True` decoding (`official_greedy_search`: argmax, `num_beams` and
                `min_length` ignored, [SEP] forced at `max_length`, output padded to `max_length`); the SCST baseline.
            generate_kwargs: generation options; defaults from `self.generation_config`: `num_beams` 3,
                `max_length` 20 and `min_length` 5 (both counting the prompt), eos [SEP]
                (`text_config.eos_token_id`), pad 0. The official search takes `num_beams`, `max_length` /
                `max_new_tokens`, `min_length`, `length_penalty`, `early_stopping`, `repetition_penalty`,
                `num_return_sequences` and `return_dict_in_generate` (sequences and their scores).
                `num_beams=1` or sampling run transformers' `generate` (4.12.5 greedy search is the same).

        Returns:
            `(B * num_return_sequences, L)` ids: the prompt, the caption, [SEP], then [PAD]. Decode with
            `skip_special_tokens=True` and cut the prompt's characters (official).
        """
        image = self.encode_image(pixel_values).last_hidden_state
        prompt, prompt_mask = self._prompt(input_ids, attention_mask, image.shape[0], image.device)
        options = self._generation_options(generate_kwargs)
        beams = int(options.get("num_beams") or 1)
        if official_greedy or (official_beam_scoring and beams > 1 and not options.get("do_sample")):
            return self._official_generate(prompt, prompt_mask, image, options, official_greedy)
        return self.text_decoder.generate(
            input_ids=prompt, attention_mask=prompt_mask, encoder_hidden_states=image, **options
        )

    def _prompt(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        text = self.config.text_config
        if input_ids is None:
            if text.bos_token_id is None:
                raise ValueError(
                    "generate needs the prompt input_ids (official: '[CLS] a picture of', without [SEP]) or "
                    "text_config.bos_token_id (the tokenizer's [CLS] id) to start from [CLS]."
                )
            return torch.full((batch, 1), int(text.bos_token_id), dtype=torch.long, device=device), None
        if input_ids.dim() != 2 or input_ids.shape[0] != batch:
            raise ValueError(
                f"input_ids must be the prompts ({batch}, P), one per image, got {tuple(input_ids.shape)}."
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}."
            )
        eos = text.eos_token_id
        if input_ids.shape[1] > 1 and eos is not None and bool((input_ids[:, -1] == eos).all()):
            # A prompt tokenised with its [SEP] (the official drops it too): generation continues the text.
            input_ids = input_ids[:, :-1]
            attention_mask = None if attention_mask is None else attention_mask[:, :-1]
        return input_ids, attention_mask

    def _generation_options(self, generate_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's options over the head's generation config, with [SEP] and [PAD] from the text config."""
        config = generate_kwargs.pop("generation_config", None) or self.generation_config
        diff = config.to_diff_dict()
        options = {k: v for k, v in diff.items() if not k.startswith("_") and k != "transformers_version"}
        options.update(generate_kwargs)
        eos = options.get("eos_token_id", self.config.text_config.eos_token_id)
        if eos is None:
            raise ValueError(
                "generate needs text_config.eos_token_id (the tokenizer's [SEP] id): set it, e.g. "
                "model.config.text_config.eos_token_id = tokenizer.sep_token_id."
            )
        options["eos_token_id"] = eos
        options.setdefault("pad_token_id", self.config.text_config.pad_id)
        return options

    def _official_generate(
        self,
        prompt: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        image: torch.Tensor,
        options: dict[str, Any],
        greedy: bool,
    ) -> torch.LongTensor | GenerateBeamDecoderOnlyOutput:
        unsupported = sorted(k for k, v in options.items() if k not in _OFFICIAL_OPTIONS and v is not None)
        if unsupported or options.get("output_attentions") or options.get("output_hidden_states"):
            raise TypeError(
                f"The official caption decoding does not take {', '.join(unsupported) or 'output flags'}: pass "
                "official_beam_scoring=False for transformers' generate."
            )
        eos = options["eos_token_id"]
        eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
        pad = int(options["pad_token_id"])
        max_length = options.get("max_length") or DEFAULT_MAX_LENGTH
        if options.get("max_new_tokens") is not None:
            max_length = prompt.shape[1] + int(options["max_new_tokens"])
        repetition_penalty = float(options.get("repetition_penalty") or 1.0)
        use_cache = options.get("use_cache") is not False
        if greedy and options.get("do_sample"):
            raise ValueError(
                "official_greedy decodes by argmax; OSCAR's sampling (the official SCST) is not reproduced: sample "
                "with transformers' generate (do_sample=True, top_k=0)."
            )
        if greedy:
            return official_greedy_search(
                self.text_decoder, prompt, image, attention_mask=prompt_mask, eos_token_id=eos, pad_token_id=pad,
                max_length=int(max_length), repetition_penalty=repetition_penalty, use_cache=use_cache,
            )
        early_stopping = options.get("early_stopping") or False
        if early_stopping not in (True, False):
            raise ValueError(
                f"The official beam search takes early_stopping True or False, got {early_stopping!r}: pass "
                "official_beam_scoring=False for transformers' other settings."
            )
        sequences, scores = official_beam_search(
            self.text_decoder,
            prompt,
            image,
            attention_mask=prompt_mask,
            eos_token_id=eos,
            pad_token_id=pad,
            num_beams=int(options["num_beams"]),
            max_length=int(max_length),
            min_length=int(options.get("min_length") or 0),
            length_penalty=float(1.0 if options.get("length_penalty") is None else options["length_penalty"]),
            early_stopping=early_stopping,
            repetition_penalty=repetition_penalty,
            num_return_sequences=int(options.get("num_return_sequences") or 1),
            use_cache=use_cache,
        )
        if options.get("return_dict_in_generate"):
            return GenerateBeamDecoderOnlyOutput(sequences=sequences, sequences_scores=scores)
        return sequences


__all__ = [
    "CAPTION_PROMPT",
    "DEFAULT_LABEL_SMOOTHING",
    "XVLMForConditionalGeneration",
    "XVLMForConditionalGenerationOutput",
    "caption_labels",
    "captioning_decoder_config",
    "captioning_init_state",
    "label_smoothed_next_token_loss",
]
