"""One contract for every head (docs/heads.md): the loss rule, TypeError for unknown arguments, tuples with
`return_dict=False`, gradient checkpointing in both modes, declared attention backends."""

from __future__ import annotations

import pytest
import torch

from modeling_xvlm import (
    XVLMConfig,
    XVLMForConditionalGeneration,
    XVLMForGrounding,
    XVLMForPretraining,
    XVLMForQuestionAnswering,
    XVLMForRetrieval,
    XVLMModel,
)
from modeling_xvlm.modeling_xvlm_captioning import caption_labels

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = (
    XVLMModel, XVLMForRetrieval, XVLMForGrounding, XVLMForPretraining, XVLMForQuestionAnswering,
    XVLMForConditionalGeneration,
)


def _config() -> XVLMConfig:
    return XVLMConfig.from_preset(
        "tiny", text_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    )


def _batch(cls: type, tiny_inputs: dict) -> dict:
    """The smallest batch with targets for each head."""
    batch = dict(tiny_inputs)
    if cls is XVLMModel:
        batch["return_loss"] = True
    elif cls is XVLMForRetrieval:
        batch["image_ids"] = torch.tensor([0, 1])
    elif cls is XVLMForGrounding:
        batch["labels"] = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.2, 0.3]])
    elif cls is XVLMForQuestionAnswering:
        batch["labels"] = torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0]])  # [CLS] answer [SEP] [PAD]
    elif cls is XVLMForConditionalGeneration:
        batch["labels"] = caption_labels(batch["input_ids"], batch["attention_mask"])  # the captions themselves
    else:
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, 2] = batch["input_ids"][:, 2]
        masked = batch["input_ids"].clone()
        masked[:, 2] = 4
        batch.update(mlm_input_ids=masked, mlm_labels=labels)
    return batch


@pytest.mark.parametrize("cls", HEADS[1:])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_loss_iff_targets_or_return_loss_in_both_modes(cls, mode, tiny_inputs):
    model = cls(_config()).train(mode == "train")
    batch = _batch(cls, tiny_inputs)
    assert model(**batch).loss is not None
    assert model(**batch, return_loss=False).loss is None
    assert model(**tiny_inputs).loss is None  # no targets, no loss, whatever the mode


@pytest.mark.parametrize(
    "cls, wrong",
    [(XVLMModel, "return_losses"), (XVLMForRetrieval, "image_idx"), (XVLMForGrounding, "label"),
     (XVLMForPretraining, "target_boxes"), (XVLMForQuestionAnswering, "answer_weight"),
     (XVLMForConditionalGeneration, "prompt_length")],
)
def test_unknown_keyword_is_a_type_error_naming_it(cls, wrong, tiny_inputs):
    model = cls(_config())
    with pytest.raises(TypeError, match=wrong):
        model(**tiny_inputs, **{wrong: None})
    # transformers' own keyword arguments (Trainer passes num_items_in_batch) keep working.
    out = model(**_batch(cls, tiny_inputs), num_items_in_batch=4, output_hidden_states=False)
    assert out.loss is not None


@pytest.mark.parametrize("cls", HEADS)
def test_return_dict_false_gives_tuples(cls, tiny_inputs):
    model = cls(_config()).eval()
    batch = _batch(cls, tiny_inputs)
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.to_tuple()[0])


def test_feature_getters_return_tuples_on_request(tiny_inputs):
    model = XVLMModel(_config()).eval()
    with torch.no_grad():
        image = model.get_image_features(tiny_inputs["pixel_values"])
        image_tuple = model.get_image_features(tiny_inputs["pixel_values"], return_dict=False)
        text = model.get_text_features(tiny_inputs["input_ids"], tiny_inputs["attention_mask"])
        text_tuple = model.get_text_features(
            tiny_inputs["input_ids"], tiny_inputs["attention_mask"], return_dict=False
        )
    assert isinstance(image_tuple, tuple) and isinstance(text_tuple, tuple)
    assert torch.equal(image_tuple[0], image.last_hidden_state) and torch.equal(image_tuple[1], image.pooler_output)
    assert torch.equal(text_tuple[1], text.pooler_output)
    assert image.pooler_output.shape == (2, model.config.projection_dim)


@pytest.mark.parametrize("cls", HEADS)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_trains_every_head(cls, use_reentrant, tiny_inputs):
    torch.manual_seed(0)
    reference = cls(_config()).train()
    checkpointed = cls(_config()).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    batch = _batch(cls, tiny_inputs)
    losses = []
    for model in (reference, checkpointed):
        torch.manual_seed(1)  # the same hard negatives
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    word = {
        XVLMModel: "text_model.embeddings.word_embeddings.weight",
        XVLMForConditionalGeneration: "text_decoder.text_model.embeddings.word_embeddings.weight",  # no `xvlm`
    }.get(cls, "xvlm.text_model.embeddings.word_embeddings.weight")
    grads = {n: p.grad for n, p in checkpointed.named_parameters()}
    ref = dict(reference.named_parameters())
    assert grads[word] is not None and torch.allclose(grads[word], ref[word].grad, atol=1e-5)


def test_unsupported_attention_backends_are_refused(tmp_path):
    XVLMForRetrieval(_config()).save_pretrained(tmp_path)
    for implementation in ("eager", "sdpa"):
        model = XVLMForRetrieval.from_pretrained(tmp_path, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
    with pytest.raises(ValueError, match="(?i)flex"):
        XVLMForRetrieval.from_pretrained(tmp_path, attn_implementation="flex_attention")


def test_a_processor_caption_batch_goes_straight_into_captioning(tiny_tokenizer, rgb_image):
    from modeling_xvlm import XVLMImageProcessorPil, XVLMProcessor

    processor = XVLMProcessor(XVLMImageProcessorPil(size={"height": 64, "width": 64}, patch_size=8), tiny_tokenizer)
    batch = processor.encode_captions(["A red circle on the left.", "a dog"])
    pixel_values = processor(images=[rgb_image, rgb_image])["pixel_values"]
    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(tiny_tokenizer)})
    model = XVLMForConditionalGeneration(config).eval()
    out = model(pixel_values=pixel_values, **batch)
    labels = caption_labels(batch["input_ids"], batch["attention_mask"], prompt_length=4)
    assert torch.equal(batch["labels"], labels)
    assert out.loss is not None and torch.isfinite(out.loss) and out.loss > 0
    assert out.logits.shape == (*batch["input_ids"].shape, len(tiny_tokenizer))


def test_a_processor_batch_with_boxes_goes_straight_into_grounding_and_pretraining(tiny_tokenizer, rgb_image):
    from modeling_xvlm import XVLMImageProcessorPil, XVLMProcessor

    processor = XVLMProcessor(XVLMImageProcessorPil(size={"height": 64, "width": 64}, patch_size=8), tiny_tokenizer)
    batch = processor(images=[rgb_image, rgb_image], text=[["a red circle", "the left square"], ["a dog"]],
                      boxes=[[[4, 4, 20, 16], [30, 10, 16, 30]], [None]])
    assert {"labels", "region_masks", "image_index"} <= set(batch)
    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(tiny_tokenizer)})
    grounding = XVLMForGrounding(config).eval()(**batch)
    assert grounding.loss is not None and grounding.pred_boxes.shape == (3, 4)
    pretraining = XVLMForPretraining(config).eval()(**batch)
    assert pretraining.loss is not None and pretraining.loss_bbox_l1 is not None and pretraining.loss_itc is not None
