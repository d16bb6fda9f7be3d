"""Task heads: XVLMForRetrieval, XVLMForGrounding, XVLMForPretraining (tiny config)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForPreTraining, AutoModelForZeroShotImageClassification

from modeling_xvlm import (XVLMConfig, XVLMForGrounding, XVLMForPretraining, XVLMForRetrieval, XVLMForTextAssignment,
                          XVLMModel)


def _config(**kwargs) -> XVLMConfig:
    # No dropout, so that overfitting curves are monotone enough to check in a few steps.
    return XVLMConfig.from_preset(
        "tiny", text_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, **kwargs
    )


def _texts(n: int, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (n, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[-1, length - 2 :] = 0
    return ids, mask


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _assert_all_grads(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _overfit(model: torch.nn.Module, batch: dict, steps: int = 12, lr: float = 3e-3) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- retrieval ------------------------------------------------------------------------------------------------------


def test_retrieval_loss_parts_and_gradients():
    model = XVLMForRetrieval(_config()).train()
    ids, mask = _texts(4)
    out = model(_images(4), ids, mask, image_ids=torch.tensor([0, 0, 1, 2]))
    assert torch.isfinite(out.loss) and out.loss_itc > 0 and out.loss_itm > 0
    assert torch.allclose(out.loss, out.loss_itc + out.loss_itm)
    assert out.itm_labels.tolist() == [1] * 4 + [0] * 8
    assert out.itm_logits.shape == (4, 2) and out.logits_per_image.shape == (4, 4)
    out.loss.backward()
    _assert_all_grads(model)


def test_retrieval_loss_weights_from_config():
    model = XVLMForRetrieval(_config(itc_loss_weight=0.5, itm_loss_weight=2.0)).train()
    ids, mask = _texts(3)
    out = model(_images(3), ids, mask, image_ids=torch.arange(3))
    assert torch.allclose(out.loss, 0.5 * out.loss_itc + 2.0 * out.loss_itm)


def test_retrieval_overfits_a_few_pairs():
    # At the default init scale (0.02) the tiny text encoder's [CLS] features of different texts start almost
    # identical (cosine 0.9999) and ITC needs many steps to separate them; a larger init scale keeps this fast.
    config = XVLMConfig.from_preset(
        "tiny",
        text_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.3},
        initializer_range=0.3,
    )
    model = XVLMForRetrieval(config)
    ids, mask = _texts(3)
    batch = {"pixel_values": _images(3), "input_ids": ids, "attention_mask": mask, "return_loss": True}
    losses = _overfit(model, batch, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_retrieval_inference_without_loss_is_per_sample_and_deterministic():
    model = XVLMForRetrieval(_config()).eval()
    ids, mask = _texts(3)
    pixels = _images(3)
    with torch.no_grad():
        out = model(pixels, ids, mask)
        again = model(pixels, ids, mask)
        single = model(pixels[:1], ids[:1], mask[:1])
    assert out.loss is None and out.itm_logits.shape == (3, 2)
    assert torch.equal(out.itm_logits, again.itm_logits)
    assert torch.allclose(out.itm_logits[:1], single.itm_logits, atol=1e-5)
    assert torch.allclose(out.logits_per_image[:1, :1], single.logits_per_image, atol=1e-5)
    # Unequal numbers of images and texts: similarities only.
    with torch.no_grad():
        zs = model(pixels[:1], ids, mask)
    assert zs.logits_per_image.shape == (1, 3) and zs.itm_logits is None
    # The loss rule is the same in train and eval mode: a loss iff targets (image_ids) or return_loss=True.
    assert model.train()(pixels, ids, mask).loss is None
    assert model.eval()(pixels, ids, mask, image_ids=torch.tensor([0, 0, 1])).loss is not None
    assert model.eval()(pixels, ids, mask, return_loss=True).loss is not None
    assert model.train()(pixels, ids, mask, image_ids=torch.arange(3), return_loss=False).loss is None


def test_retrieval_itm_scores_match_forward_and_shared_images():
    model = XVLMForRetrieval(_config()).eval()
    ids, mask = _texts(4)
    pixels = _images(2)
    with torch.no_grad():
        shared = model.itm_scores(pixel_values=pixels, input_ids=ids, attention_mask=mask, image_index=torch.tensor([0, 1, 1, 0]))
        expanded = model.itm_scores(pixel_values=pixels[[0, 1, 1, 0]], input_ids=ids, attention_mask=mask)
        forward = model(pixels[[0, 1, 1, 0]], ids, mask).itm_logits[:, 1]
    assert torch.allclose(shared, expanded, atol=1e-5) and torch.allclose(expanded, forward, atol=1e-5)


def test_retrieval_return_dict_false():
    model = XVLMForRetrieval(_config()).train()
    ids, mask = _texts(2)
    out = model(_images(2), ids, mask, return_loss=True, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0


# -- grounding ------------------------------------------------------------------------------------------------------


def test_grounding_has_no_projections_and_all_params_get_gradients():
    model = XVLMForGrounding(_config()).train()
    assert model.xvlm.vision_proj is None and model.xvlm.temp is None
    ids, mask = _texts(3)
    labels = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.4, 0.2], [0.7, 0.2, 0.1, 0.1]])
    out = model(_images(3), ids, mask, labels=labels)
    assert out.pred_boxes.shape == (3, 4) and ((out.pred_boxes > 0) & (out.pred_boxes < 1)).all()
    assert out.loss_bbox_l1 > 0 and out.loss_bbox_giou > 0
    assert torch.allclose(out.loss, out.loss_bbox_l1 + out.loss_bbox_giou)
    out.loss.backward()
    _assert_all_grads(model)


def test_grounding_label_validation():
    model = XVLMForGrounding(_config()).eval()
    ids, mask = _texts(2)
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        model(_images(2), ids, mask, labels=torch.rand(2, 5))
    with pytest.raises(ValueError, match="normalised"):
        model(_images(2), ids, mask, labels=torch.tensor([[0.5, 0.5, 2.0, 0.1], [0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="NaN"):
        model(_images(2), ids, mask, labels=torch.tensor([[0.5, float("nan"), 0.1, 0.1]] * 2))


def test_grounding_image_index_and_batch_one():
    model = XVLMForGrounding(_config()).eval()
    ids, mask = _texts(3)
    pixels = _images(2)
    with torch.no_grad():
        shared = model(pixels, ids, mask, image_index=torch.tensor([1, 0, 1])).pred_boxes
        expanded = model(pixels[[1, 0, 1]], ids, mask).pred_boxes
        single = model(pixels[1:2], ids[:1], mask[:1]).pred_boxes
    assert torch.allclose(shared, expanded, atol=1e-5) and torch.allclose(shared[:1], single, atol=1e-5)


def test_grounding_overfits_boxes():
    model = XVLMForGrounding(_config())
    ids, mask = _texts(2)
    labels = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])
    losses = _overfit(model, {"pixel_values": _images(2), "input_ids": ids, "attention_mask": mask, "labels": labels})
    assert losses[-1] < 0.5 * losses[0]


# -- pre-training ---------------------------------------------------------------------------------------------------


def _region_batch(config: XVLMConfig) -> dict:
    """2 images, 4 entries: a whole-image caption and a region of image 0, two regions of image 1."""
    ids, mask = _texts(4, seed=3)
    side = config.image_size // config.patch_stride
    region_masks = torch.zeros(4, 1 + side * side)
    region_masks[:, 0] = 1
    grid = region_masks[:, 1:].view(4, side, side)
    grid[0] = 1
    grid[1, 0:3, 0:4] = 1
    grid[2, 2:6, 4:8] = 1
    grid[3, 5:8, 0:2] = 1
    mlm_input_ids = ids.clone()
    mlm_labels = torch.full_like(ids, -100)
    mlm_labels[:, 2] = ids[:, 2]
    mlm_labels[1, 4] = ids[1, 4]
    mlm_input_ids[mlm_labels != -100] = 4
    return {
        "pixel_values": _images(2, seed=5),
        "input_ids": ids,
        "attention_mask": mask,
        "image_index": torch.tensor([0, 0, 1, 1]),
        "region_masks": region_masks,
        "mlm_input_ids": mlm_input_ids,
        "mlm_labels": mlm_labels,
        "labels": torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.19, 0.5, 0.375], [0.75, 0.5, 0.5, 0.5], [0.125, 0.81, 0.25, 0.375]]),
        "is_image": torch.tensor([1, 0, 0, 0]),
    }


def test_pretraining_region_batch_losses_and_gradients():
    config = _config()
    model = XVLMForPretraining(config).train()
    batch = _region_batch(config)
    out = model(**batch)
    for name in ("loss_itc", "loss_itm", "loss_mlm", "loss_bbox_l1", "loss_bbox_giou"):
        value = getattr(out, name)
        assert torch.isfinite(value) and value > 0, name
    total = out.loss_itc + out.loss_itm + out.loss_mlm + out.loss_bbox_l1 + out.loss_bbox_giou
    assert torch.allclose(out.loss, total)
    assert out.itm_logits.shape == (12, 2) and out.pred_boxes.shape == (4, 4)
    assert out.mlm_logits.shape == (5, config.text_config.vocab_size)
    out.loss.backward()
    _assert_all_grads(model)


def test_pretraining_mlm_loss_only_at_labelled_positions():
    config = _config()
    model = XVLMForPretraining(config).eval()
    batch = _region_batch(config)
    with torch.no_grad():
        out = model(**batch)
        full = model(**{**batch, "mlm_labels": None, "labels": None, "return_loss": False}).mlm_logits
    labels = batch["mlm_labels"]
    masked = labels != -100
    expected = torch.nn.functional.cross_entropy(full[masked], labels[masked])
    assert full.shape == (4, 7, config.text_config.vocab_size)
    assert torch.allclose(out.loss_mlm, expected, atol=1e-5)


def test_pretraining_box_losses_only_for_regions():
    config = _config()
    model = XVLMForPretraining(config).eval()
    batch = _region_batch(config)
    with torch.no_grad():
        out = model(**batch)
        # Changing the target of the whole-image entry does not change the box losses.
        other_targets = batch["labels"].clone()
        other_targets[0] = torch.tensor([0.1, 0.1, 0.1, 0.1])
        other = model(**{**batch, "labels": other_targets})
        # A batch of whole-image entries only: box losses 0, not NaN.
        only_images = model(**{**batch, "is_image": torch.ones(4)})
    assert torch.allclose(out.loss_bbox_l1, other.loss_bbox_l1) and torch.allclose(out.loss_bbox_giou, other.loss_bbox_giou)
    assert only_images.loss_bbox_l1.item() == 0.0 and only_images.loss_bbox_giou.item() == 0.0


def test_pretraining_plain_image_text_batch():
    config = _config()
    model = XVLMForPretraining(config).train()
    batch = _region_batch(config)
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")}
    out = model(pixel_values=_images(4), **plain)
    assert out.loss_bbox_l1 is None and out.pred_boxes is None
    assert torch.allclose(out.loss, out.loss_itc + out.loss_itm + out.loss_mlm)
    # Several captions of one image: they are ITC positives of each other and never ITM negatives.
    out = model(pixel_values=_images(2), image_index=torch.tensor([0, 0, 1, 1]), **plain)
    labels = out.itm_labels
    assert torch.isfinite(out.loss) and labels[:4].eq(1).all() and labels[4:].eq(0).all()


def test_pretraining_temperature_clamp():
    config = _config()
    model = XVLMForPretraining(config).train()
    with torch.no_grad():
        model.xvlm.temp.fill_(0.9)
    ids, mask = _texts(2)
    model(pixel_values=_images(2), input_ids=ids, attention_mask=mask)
    assert model.xvlm.temp.item() == pytest.approx(0.5)


def test_pretraining_overfits():
    config = _config()
    model = XVLMForPretraining(config)
    losses = _overfit(model, _region_batch(config), steps=12)
    assert losses[-1] < 0.7 * losses[0]


def test_pretraining_tied_decoder_save_load_and_resize(tmp_path):
    model = XVLMForPretraining(_config())
    embeddings = model.get_input_embeddings()
    assert model.mlm_head.decoder.weight is embeddings.weight
    assert model.get_output_embeddings() is model.mlm_head.decoder
    model.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert type(loaded) is XVLMForPretraining
    assert loaded.mlm_head.decoder.weight is loaded.get_input_embeddings().weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    model.resize_token_embeddings(136)
    assert model.mlm_head.decoder.weight is model.get_input_embeddings().weight
    assert model.mlm_head.decoder.bias.shape == (136,)
    assert model.config.text_config.vocab_size == 136


def test_auto_classes_and_base_checkpoint_loads_into_heads(tmp_path):
    config = _config()
    assert type(AutoModelForZeroShotImageClassification.from_config(config)) is XVLMForRetrieval
    from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config

    # one Auto class, two heads: config.architectures picks
    for head, head_config in ((XVLMForPretraining, config), (XVLMForTextAssignment, nlvr2_config(config))):
        named = XVLMConfig.from_dict({**head_config.to_dict(), "architectures": [head.__name__]})
        assert type(AutoModelForPreTraining.from_config(named)) is head
    assert type(AutoModel.from_config(config)) is XVLMModel
    base = XVLMModel(config)
    base.save_pretrained(tmp_path)
    for cls in (XVLMForRetrieval, XVLMForGrounding, XVLMForPretraining):
        head = cls.from_pretrained(tmp_path)
        assert torch.equal(head.xvlm.text_model.embeddings.word_embeddings.weight, base.text_model.embeddings.word_embeddings.weight)
        assert torch.equal(
            head.xvlm.vision_model.embeddings.patch_embeddings.projection.weight,
            base.vision_model.embeddings.patch_embeddings.projection.weight,
        )
        assert head.get_input_embeddings() is head.xvlm.text_model.embeddings.word_embeddings


def test_head_state_dict_keys():
    keys = set(XVLMForPretraining(_config()).state_dict())
    for key in (
        "itm_head.0.weight", "itm_head.1.weight", "itm_head.3.bias", "bbox_head.0.weight", "bbox_head.3.bias",
        "mlm_head.transform.dense.weight", "mlm_head.transform.LayerNorm.weight", "mlm_head.decoder.bias",
        "mlm_head.decoder.weight", "xvlm.temp", "xvlm.vision_proj.weight",
    ):  # fmt: skip
        assert key in keys, key
    assert not any(k.startswith(("itm_head.2", "bbox_head.2")) for k in keys)


def test_pretraining_from_vision_text_pretrained_takes_bert_mlm_head(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, SwinConfig, SwinModel

    swin_config = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    SwinModel(swin_config).save_pretrained(tmp_path / "swin")
    bert_config = BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    bert = BertForMaskedLM(bert_config)
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()
    bert.save_pretrained(tmp_path / "bert")
    model = XVLMForPretraining.from_vision_text_pretrained(str(tmp_path / "swin"), str(tmp_path / "bert"))
    state = bert.state_dict()
    torch.testing.assert_close(model.mlm_head.decoder.bias, state["cls.predictions.bias"])
    torch.testing.assert_close(model.mlm_head.transform.dense.weight, state["cls.predictions.transform.dense.weight"])
    torch.testing.assert_close(model.mlm_head.decoder.weight, state["bert.embeddings.word_embeddings.weight"])
    assert model.mlm_head.decoder.weight is model.get_input_embeddings().weight
    new = set(model.newly_initialized_keys)
    assert {"itm_head.0.weight", "bbox_head.3.bias", "xvlm.temp"} <= new
    assert not any(k.startswith("mlm_head") for k in new)
    grounding = XVLMForGrounding.from_vision_text_pretrained(str(tmp_path / "swin"), str(tmp_path / "bert"))
    torch.testing.assert_close(
        grounding.xvlm.text_model.embeddings.word_embeddings.weight, state["bert.embeddings.word_embeddings.weight"]
    )


# -- pre-training box targets are checked as grounding's; excluded rows cannot poison the loss --------------------


def test_pretraining_nan_target_on_an_excluded_row_leaves_loss_and_gradients_finite():
    config = _config()
    model = XVLMForPretraining(config).train()
    batch = _region_batch(config)
    reference = model(**batch)
    poisoned = batch["labels"].clone()
    poisoned[0] = float("nan")  # row 0 is the whole-image caption (is_image = 1)
    out = model(**{**batch, "labels": poisoned})
    torch.testing.assert_close(out.loss_bbox_l1, reference.loss_bbox_l1)
    torch.testing.assert_close(out.loss_bbox_giou, reference.loss_bbox_giou)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "row, value, match",
    [(1, [float("nan")] * 4, "NaN or infinite"), (2, [40.0, 30.0, 20.0, 20.0], r"normalised to \[0, 1\]"),
     (3, [0.5, 0.5, -0.2, 0.3], r"normalised to \[0, 1\]")],
)
def test_pretraining_rejects_bad_targets_on_region_rows(row, value, match):
    config = _config()
    model = XVLMForPretraining(config).eval()
    batch = _region_batch(config)
    labels = batch["labels"].clone()
    labels[row] = torch.tensor(value)
    with pytest.raises(ValueError, match=match):
        model(**{**batch, "labels": labels})


def test_pretraining_is_image_must_be_zero_or_one():
    config = _config()
    model = XVLMForPretraining(config).eval()
    batch = _region_batch(config)
    with pytest.raises(ValueError, match=r"is_image must hold 0 .* or 1"):
        model(**{**batch, "is_image": torch.tensor([2, 0, 0, 0])})
    with pytest.raises(ValueError, match=r"is_image must hold 0 .* or 1"):
        model(**{**batch, "is_image": torch.tensor([0.5, 0.0, 0.0, 0.0])})
