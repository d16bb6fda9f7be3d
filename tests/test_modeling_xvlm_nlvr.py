"""The NLVR2 heads: two images per sentence, tied cross-attention pairs, the pre-training -> NLVR2 initialisation
and the text-assignment pre-training (official `models/model_nlvr.py`, `models/model_nlvr_pretrain.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_xvlm import XVLMConfig, XVLMForPretraining
from modeling_xvlm.modeling_xvlm_nlvr import (
    XVLMForImagesAndTextClassification,
    XVLMForTextAssignment,
    duplicate_fusion_layers,
    nlvr2_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _config() -> XVLMConfig:
    base = XVLMConfig.from_preset(
        "tiny", text_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "num_hidden_layers": 3}
    )
    return nlvr2_config(base)  # 1 text layer + 2 x 2 fusion layers


def _batch(n: int = 3) -> dict:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 128, (n, 7), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[-1, 5:] = 0
    return {"pixel_values": torch.randn(n, 2, 3, 64, 64, generator=generator), "input_ids": ids,
            "attention_mask": mask}


def test_nlvr2_config_doubles_the_fusion_layers():
    config = _config()
    assert config.text_config.fusion_layer == 1 and config.text_config.num_hidden_layers == 5
    assert config.text_config.tie_cross_attention_pairs
    assert nlvr2_config(config) is config
    with pytest.raises(ValueError, match="nlvr2_config"):
        XVLMForImagesAndTextClassification(XVLMConfig.from_preset("tiny"))


def test_logits_follow_the_official_layer_to_image_assignment():
    model = XVLMForImagesAndTextClassification(_config()).eval()
    batch = _batch()
    with torch.no_grad():
        out = model(**batch)
        swapped = model(**{**batch, "pixel_values": batch["pixel_values"].flip(1)})
        # By hand: Swin on each image, then every layer of the stack, fusion layer 1 + j reading image j % 2.
        left = model.xvlm.encode_image(batch["pixel_values"][:, 0]).last_hidden_state
        right = model.xvlm.encode_image(batch["pixel_values"][:, 1]).last_hidden_state
        text = model.xvlm.text_model
        hidden = text.embeddings(batch["input_ids"])
        mask = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        for index, layer in enumerate(text.encoder.layer):
            image = None if index < 1 else (left, right)[(index - 1) % 2]
            hidden = layer(hidden, mask, image)
        by_hand = model.cls_head(hidden[:, 0])
    assert out.logits.shape == (3, 2)
    assert torch.allclose(out.logits, by_hand, atol=1e-5)
    assert (out.logits - swapped.logits).abs().max() > 1e-4  # the two images play different roles


def test_loss_rule_and_errors():
    model = XVLMForImagesAndTextClassification(_config()).train()
    batch = _batch()
    labels = torch.tensor([1, 0, 1])
    out = model(**batch, labels=labels)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.cls_head[0].weight.grad is not None
    assert model(**batch).loss is None
    with pytest.raises(ValueError, match=r"\(batch, 2, 3, H, W\)"):
        model(pixel_values=batch["pixel_values"][:, 0], input_ids=batch["input_ids"])
    with pytest.raises(TypeError, match="label"):
        model(**batch, label=labels)


def test_tied_pairs_are_trained_once_and_saved_once(tmp_path):
    model = XVLMForImagesAndTextClassification(_config())
    layers = model.xvlm.text_model.encoder.layer
    assert layers[2].crossattention.self.key.weight is layers[1].crossattention.self.key.weight
    assert layers[4].crossattention.self.value.bias is layers[3].crossattention.self.value.bias
    model.save_pretrained(tmp_path)
    loaded = XVLMForImagesAndTextClassification.from_pretrained(tmp_path).eval()
    lay = loaded.xvlm.text_model.encoder.layer
    assert lay[2].crossattention.self.key.weight is lay[1].crossattention.self.key.weight
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)


def test_from_pretraining_copies_each_fusion_layer_to_its_pair():
    pretrain = XVLMForPretraining(
        XVLMConfig.from_preset("tiny", text_config={"num_hidden_layers": 3})
    )
    model = XVLMForImagesAndTextClassification.from_pretraining(pretrain)
    source = pretrain.xvlm.text_model.encoder.layer
    target = model.xvlm.text_model.encoder.layer
    assert torch.equal(target[0].attention.self.query.weight, source[0].attention.self.query.weight)
    for pretrained, copies in ((1, (1, 2)), (2, (3, 4))):
        for copy in copies:
            for name in ("attention.self.query.weight", "crossattention.self.key.weight", "output.dense.bias"):
                assert torch.equal(target[copy].get_parameter(name), source[pretrained].get_parameter(name))
    assert any(k.startswith("cls_head.") for k in model.newly_initialized_keys)
    assert not any(k.startswith("xvlm.") for k in model.newly_initialized_keys)
    ta = XVLMForTextAssignment.from_pretraining(pretrain)
    assert torch.equal(ta.vision_proj.weight, pretrain.xvlm.vision_proj.weight)
    assert all(k.startswith("ta_head.") for k in ta.newly_initialized_keys)
    state = {"text_model.encoder.layer.2.x": torch.tensor(1.0), "other": torch.tensor(2.0)}
    assert set(duplicate_fusion_layers(state, "text_model.", pretrain.config.text_config)) == {
        "text_model.encoder.layer.3.x", "text_model.encoder.layer.4.x", "other"
    }


def _official_ta_sampling(features: torch.Tensor) -> tuple[list[tuple[int, int]], list[int]]:
    """The official sampling loop (`model_nlvr_pretrain.py`) written from its description."""
    sim = features @ features.t() / 0.07
    weights = F.softmax(sim, dim=1)
    weights.fill_diagonal_(0)
    pairs, labels = [], []
    for b in range(features.shape[0]):
        if torch.rand(1) > 1 / 3:
            idx = torch.multinomial(weights[b], 1).item()
            if torch.rand(1) > 0.5:
                pairs.append((b, idx)); labels.append(0)
            else:
                pairs.append((idx, b)); labels.append(1)
        else:
            idx = torch.multinomial(weights[b], 2)
            pairs.append((int(idx[0]), int(idx[1]))); labels.append(2)
    return pairs, labels


def test_text_assignment_samples_the_official_pairs_and_scores_fixed_pairs():
    model = XVLMForTextAssignment(_config()).train()
    batch = _batch(6)
    images = batch["pixel_values"][:, 0]
    torch.manual_seed(11)
    out = model(images, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        embeds = model.xvlm.encode_image(images).last_hidden_state
        features = F.normalize(model.vision_proj(embeds[:, 0]), dim=-1)
    torch.manual_seed(11)
    pairs, labels = _official_ta_sampling(features)
    assert out.pair_index.tolist() == [list(p) for p in pairs] and out.labels.tolist() == labels
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, out.labels))
    # Fixed pairs: deterministic logits, the same pairs give the same logits.
    model.eval()
    with torch.no_grad():
        fixed = model(images, batch["input_ids"], batch["attention_mask"], pair_index=out.pair_index,
                      labels=out.labels)
        again = model(images, batch["input_ids"], batch["attention_mask"], pair_index=out.pair_index)
    assert torch.allclose(fixed.logits, out.logits, atol=1e-5) and again.loss is None
    with pytest.raises(ValueError, match="pair_index"):
        model(images, batch["input_ids"], labels=out.labels)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_trains_the_nlvr2_head(use_reentrant):
    batch, labels = _batch(), torch.tensor([1, 0, 1])
    torch.manual_seed(0)
    reference = XVLMForImagesAndTextClassification(_config()).train()
    checkpointed = XVLMForImagesAndTextClassification(_config()).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    losses = []
    for model in (reference, checkpointed):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    key = "xvlm.text_model.encoder.layer.1.crossattention.self.key.weight"  # tied with layer 2's: one gradient
    assert torch.allclose(checkpointed.get_parameter(key).grad, reference.get_parameter(key).grad, atol=1e-5)
