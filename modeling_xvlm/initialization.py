"""Initialising X-VLM from a Swin checkpoint and a BERT checkpoint (the official pre-training start).

Official `XVLMBase.__init__` loads Swin weights into the vision encoder and `BertForMaskedLM` weights into the
12-layer text/fusion stack (and the MLM head); cross-attention blocks, projections, temperature and heads are new.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import BertConfig, BertForMaskedLM, SwinConfig, SwinModel

from .configuration_xvlm import BERT_TEXT_FIELDS, XVLMConfig

logger = logging.getLogger(__name__)


def text_config_from_bert(bert_config: BertConfig, fusion_layer: int | None = None) -> dict[str, Any]:
    """X-VLM text-config fields from a BERT config; fusion starts at half depth unless given (6 of 12)."""
    fields = {name: getattr(bert_config, name) for name in BERT_TEXT_FIELDS if hasattr(bert_config, name)}
    fields["fusion_layer"] = bert_config.num_hidden_layers // 2 if fusion_layer is None else fusion_layer
    return fields


def bert_to_xvlm_key(key: str) -> str | None:
    """Map a `BertForMaskedLM` / `BertModel` state-dict key to the X-VLM name (relative to the model holding
    `text_model`, and `mlm_head` for the pre-training head), or `None` for keys X-VLM does not use (pooler, NSP)."""
    if key.startswith("bert."):
        key = key[len("bert.") :]
    if key.startswith(("embeddings.", "encoder.layer.")):
        if key.endswith("position_ids") or key.endswith("token_type_ids"):
            return None
        return "text_model." + key
    if key.startswith("cls.predictions."):
        rest = key[len("cls.predictions.") :]
        if rest == "bias":
            return "mlm_head.decoder.bias"
        if rest.startswith("transform."):
            return "mlm_head." + rest
        return None  # decoder.weight is tied to the word embeddings; decoder.bias aliases `bias`
    return None


def build_from_vision_text_pretrained(
    model_class: type,
    vision_name_or_path: str,
    text_name_or_path: str,
    config: XVLMConfig | None = None,
    **config_kwargs: Any,
) -> Any:
    """Instantiate `model_class` (XVLMModel or a head) and fill it from a Swin and a BERT checkpoint.

    Sets `model.newly_initialized_keys` to the sorted parameter names that neither checkpoint provided.
    """
    swin = SwinModel.from_pretrained(vision_name_or_path, add_pooling_layer=False)
    bert = BertForMaskedLM.from_pretrained(text_name_or_path)
    if config is None:
        vision = swin.config.to_dict()
        vision.update({"drop_path_rate": 0.1})
        text = text_config_from_bert(bert.config)
        config = XVLMConfig(vision_config=SwinConfig(**vision), text_config=text, **config_kwargs)

    model = model_class(config)
    base = model if hasattr(model, "vision_model") else getattr(model, model.base_model_prefix)
    prefix = "" if base is model else model.base_model_prefix + "."

    vision_state = {f"{prefix}vision_model.{k}": v for k, v in swin.state_dict().items()}
    text_state: dict[str, torch.Tensor] = {}
    for key, value in bert.state_dict().items():
        target = bert_to_xvlm_key(key)
        if target is None:
            continue
        if target.startswith("text_model."):
            target = prefix + target
        text_state[target] = value

    own = model.state_dict()
    loaded = {}
    for key, value in {**vision_state, **text_state}.items():
        if key not in own:
            continue  # e.g. an MLM head when building the base model, layers beyond the configured depth
        if own[key].shape != value.shape:
            raise ValueError(
                f"Cannot initialise {key}: checkpoint shape {tuple(value.shape)} != model shape "
                f"{tuple(own[key].shape)}. Build the X-VLM config from the checkpoints (config=None) or match it."
            )
        loaded[key] = value
    model.load_state_dict(loaded, strict=False)
    model.tie_weights()
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    model.newly_initialized_keys = sorted(
        name for name, _ in model.named_parameters() if name not in loaded and name not in tied
    )
    logger.info("Newly initialised X-VLM weights: %s", model.newly_initialized_keys)
    return model
