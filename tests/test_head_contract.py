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


# ----------------------------------------------------------------------------------------------------------------
# CLIP-style features on every head (`XVLMFeaturesMixin`) and on the base model of any checkpoint
# ----------------------------------------------------------------------------------------------------------------


def _all_heads() -> dict[str, type]:
    import modeling_xvlm
    from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config

    names = ("XVLMForRetrieval", "XVLMForPretraining", "XVLMForGrounding", "XVLMForQuestionAnswering",
             "XVLMForConditionalGeneration", "XVLMForImagesAndTextClassification", "XVLMForTextAssignment")
    pair_heads = {"XVLMForImagesAndTextClassification", "XVLMForTextAssignment"}
    return {name: (getattr(modeling_xvlm, name), nlvr2_config(_config()) if name in pair_heads else _config())
            for name in names}


@pytest.mark.parametrize("name", ["XVLMForRetrieval", "XVLMForPretraining"])
def test_head_features_are_those_of_the_base_model_it_saves(name, tiny_inputs, tmp_path):
    """A head's `get_*_features` equal those of `XVLMModel.from_pretrained(head folder)` (independent load)."""
    cls, config = _all_heads()[name]
    torch.manual_seed(0)
    head = cls(config).eval()
    head.save_pretrained(tmp_path)
    base = XVLMModel.from_pretrained(tmp_path).eval()
    pixel_values, input_ids, mask = tiny_inputs["pixel_values"], tiny_inputs["input_ids"], tiny_inputs["attention_mask"]
    with torch.no_grad():
        image, text = head.get_image_features(pixel_values), head.get_text_features(input_ids, mask)
        expected_image = torch.nn.functional.normalize(base.vision_proj(base.encode_image(pixel_values)
                                                                         .last_hidden_state[:, 0]), dim=-1)
        expected_text = torch.nn.functional.normalize(base.text_proj(base.encode_text(input_ids, mask)
                                                                     .last_hidden_state[:, 0]), dim=-1)
        as_tuple = head.get_image_features(pixel_values, return_dict=False)
    assert image.pooler_output.shape == (2, config.projection_dim)
    torch.testing.assert_close(image.pooler_output, expected_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text.pooler_output, expected_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image.pooler_output.norm(dim=-1), torch.ones(2))
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], image.pooler_output)


@pytest.mark.parametrize("name", ["XVLMForGrounding", "XVLMForQuestionAnswering", "XVLMForConditionalGeneration",
                                  "XVLMForImagesAndTextClassification", "XVLMForTextAssignment"])
def test_heads_without_itc_projections_say_so_and_their_base_model_too(name, tiny_inputs, tmp_path):
    """No features of untrained weights: the head and `XVLMModel` / `AutoModel` on its checkpoint raise, naming it."""
    from transformers import AutoModel

    cls, config = _all_heads()[name]
    head = cls(config).eval()
    official_file = {"XVLMForGrounding": "model_bbox.py", "XVLMForQuestionAnswering": "model_vqa.py",
                     "XVLMForConditionalGeneration": "model_captioning.py",
                     "XVLMForImagesAndTextClassification": "model_nlvr.py",
                     "XVLMForTextAssignment": "model_nlvr_pretrain.py"}[name]
    with pytest.raises(ValueError, match=rf"{name}\.get_text_features needs .*text_proj.*{official_file}"):
        head.get_text_features(tiny_inputs["input_ids"], tiny_inputs["attention_mask"])
    if name != "XVLMForTextAssignment":  # it has `vision_proj` (next test)
        with pytest.raises(ValueError, match=rf"{name}\.get_image_features needs .*vision_proj.*{official_file}"):
            head.get_image_features(tiny_inputs["pixel_values"])
    head.save_pretrained(tmp_path)
    for base in (XVLMModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(base) is XVLMModel and base.vision_proj is None and base.text_proj is None and base.temp is None
        with pytest.raises(ValueError, match=rf"saved by {name}.*pre-training or retrieval checkpoint"):
            base.get_image_features(tiny_inputs["pixel_values"])
        with pytest.raises(ValueError, match=rf"saved by {name}"):
            base.rank(tiny_inputs["pixel_values"], tiny_inputs["input_ids"], tiny_inputs["attention_mask"])
        with torch.no_grad():  # the unprojected encoders still work
            assert base.encode_image(tiny_inputs["pixel_values"]).last_hidden_state.shape[:2] == (2, 65)


def test_heads_without_itc_match_the_base_model_rule():
    from modeling_xvlm.modeling_xvlm import HEADS_WITHOUT_ITC

    without = {name for name, (cls, _) in _all_heads().items() if cls._no_itc_features is not None}
    assert without == set(HEADS_WITHOUT_ITC)


def test_text_assignment_image_features_use_its_vision_proj(tiny_inputs):
    from modeling_xvlm import XVLMForTextAssignment
    from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config

    torch.manual_seed(0)
    model = XVLMForTextAssignment(nlvr2_config(_config())).eval()
    with torch.no_grad():
        features = model.get_image_features(tiny_inputs["pixel_values"])
        sequence = model.xvlm.encode_image(tiny_inputs["pixel_values"]).last_hidden_state
        expected = sequence[:, 0] @ model.vision_proj.weight.t() + model.vision_proj.bias
        expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(features.last_hidden_state, sequence)
    torch.testing.assert_close(features.pooler_output, expected, rtol=1e-5, atol=1e-6)


def test_base_model_rank_is_the_itc_ranking(tiny_inputs):
    """`XVLMModel.rank`: top-k of the cosine similarities computed here from the projections, both ways."""
    torch.manual_seed(0)
    model = XVLMModel(_config()).eval()
    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(5, 3, 64, 64, generator=generator)
    input_ids = torch.randint(5, model.config.text_config.vocab_size, (4, 6), generator=generator)
    input_ids[:, 0] = 2
    mask = torch.ones_like(input_ids)
    mask[2, 4:] = 0
    out = model.rank(pixel_values, input_ids, mask, k=3, batch_size=2)
    with torch.no_grad():
        image = model.vision_proj(model.encode_image(pixel_values).last_hidden_state[:, 0])
        text = model.text_proj(model.encode_text(input_ids, mask).last_hidden_state[:, 0])
    similarity = (image / image.norm(dim=-1, keepdim=True)) @ (text / text.norm(dim=-1, keepdim=True)).t()
    torch.testing.assert_close(out.similarity, similarity, rtol=1e-5, atol=1e-6)
    assert out.i2t_indices.shape == (5, 3) and out.t2i_indices.shape == (4, 3)
    assert torch.equal(out.i2t_indices, similarity.topk(3, dim=1).indices)
    assert torch.equal(out.t2i_indices, similarity.t().topk(3, dim=1).indices)
    torch.testing.assert_close(out.i2t_scores, similarity.topk(3, dim=1).values, rtol=1e-5, atol=1e-6)
    assert out.num_pairs_scored == 0 and out.num_pairs_refined == 0
    # a ModelOutput: keys, dict access and to_tuple
    assert torch.equal(out["similarity"], out.similarity)
    assert list(out.keys())[:5] == ["i2t_indices", "i2t_scores", "t2i_indices", "t2i_scores", "similarity"]
    assert torch.equal(out.to_tuple()[0], out.i2t_indices)
    # k larger than the gallery is clamped
    assert model.rank(pixel_values, input_ids, mask, k=50).t2i_indices.shape == (4, 5)


def test_encoded_galleries_are_model_outputs(tiny_inputs):
    from transformers.utils import ModelOutput

    from modeling_xvlm.retrieval import encode_images, encode_texts

    model = XVLMModel(_config()).eval()
    images = encode_images(model, tiny_inputs["pixel_values"], batch_size=1)
    texts = encode_texts(model, tiny_inputs["input_ids"], tiny_inputs["attention_mask"], batch_size=1)
    assert isinstance(images, ModelOutput) and isinstance(texts, ModelOutput)
    assert torch.equal(images["features"], images.features) and images.features.shape == (2, 16)
    assert torch.equal(texts.to_tuple()[1], tiny_inputs["attention_mask"])
    assert torch.equal(images.float().sequences, images.sequences)


@pytest.mark.parametrize("cls", HEADS[1:])
def test_padding_free_layers_give_every_head_the_same_loss_and_gradients(cls, tiny_inputs):
    """`text_config.padding_free` (the default) changes no loss and no gradient of any head (fp32, 1e-5)."""
    results = []
    for padding_free in (True, False):
        config = _config()
        config.text_config.padding_free = padding_free
        torch.manual_seed(0)
        model = cls(config).train()
        torch.manual_seed(1)  # the same hard negatives
        loss = model(**_batch(cls, tiny_inputs)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (packed_loss, packed_grads), (padded_loss, padded_grads) = results
    assert torch.allclose(packed_loss, padded_loss, atol=1e-5, rtol=0)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    worst = max((packed_grads[n] - padded_grads[n]).abs().max().item() for n in packed_grads)
    assert worst <= 1e-5, worst
