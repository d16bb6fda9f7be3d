import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, BertConfig, BertForMaskedLM, SwinConfig, SwinModel

from modeling_xvlm import XVLMConfig, XVLMModel


@pytest.fixture
def model(tiny_config):
    return XVLMModel(tiny_config).eval()


def test_base_parameter_count_matches_official():
    # Official retrieval model @384 has 213,959,547 parameters, of which the ITM head is 1,187,330.
    with torch.device("meta"):
        model = XVLMModel(XVLMConfig())
    assert sum(p.numel() for p in model.parameters()) == 213_959_547 - 1_187_330


def test_shapes_and_dtypes(model, tiny_config, tiny_inputs):
    out = model(**tiny_inputs)
    P, E = tiny_config.num_patches, tiny_config.projection_dim
    assert out.vision_model_output.last_hidden_state.shape == (2, 1 + P, tiny_config.vision_width)
    assert out.text_model_output.last_hidden_state.shape == (2, 7, tiny_config.text_config.hidden_size)
    assert out.image_embeds.shape == (2, E) and out.text_embeds.shape == (2, E)
    assert out.logits_per_image.dtype == torch.float32
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    expected = out.image_embeds @ out.text_embeds.t() / model.temp
    torch.testing.assert_close(out.logits_per_image, expected)
    assert out.loss is None
    loss = model(**tiny_inputs, return_loss=True).loss
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0


def test_image_cls_is_patch_mean(model, tiny_inputs):
    out = model.get_image_features(tiny_inputs["pixel_values"])
    sequence = out.last_hidden_state
    torch.testing.assert_close(sequence[:, 0], sequence[:, 1:].mean(dim=1))
    patches = model.vision_model(tiny_inputs["pixel_values"]).last_hidden_state
    torch.testing.assert_close(sequence[:, 1:], patches)
    torch.testing.assert_close(out.pooler_output, F.normalize(model.vision_proj(sequence[:, 0]), dim=-1))


def test_region_features(model, tiny_config, tiny_inputs):
    pixel_values = tiny_inputs["pixel_values"]
    P = tiny_config.num_patches
    masks = torch.zeros(3, 1 + P, dtype=torch.long)
    masks[:, 0] = 1
    masks[0, 1:] = 1  # whole image 0
    masks[1, 1 + torch.tensor([0, 1, 8, 9])] = 1  # 2x2 top-left block of image 1
    masks[2, 1 + 63] = 1  # one patch of image 0
    index = torch.tensor([0, 1, 0])
    regions = model.get_region_features(pixel_values, masks, index)
    image = model.get_image_features(pixel_values)
    assert regions.last_hidden_state.shape == (3, 1 + P, tiny_config.vision_width)
    torch.testing.assert_close(regions.last_hidden_state[0], image.last_hidden_state[0])
    torch.testing.assert_close(regions.pooler_output[0], image.pooler_output[0])
    patches = image.last_hidden_state[:, 1:]
    torch.testing.assert_close(regions.last_hidden_state[1, 0], patches[1, [0, 1, 8, 9]].mean(dim=0))
    torch.testing.assert_close(regions.last_hidden_state[2, 0], patches[0, 63])
    torch.testing.assert_close(regions.last_hidden_state[1, 1:], patches[1])


def test_fuse_shapes_mask_and_shared_images(model, tiny_config, tiny_inputs):
    image = model.get_image_features(tiny_inputs["pixel_values"]).last_hidden_state
    text = model.get_text_features(tiny_inputs["input_ids"], tiny_inputs["attention_mask"]).last_hidden_state
    fused = model.fuse(text, tiny_inputs["attention_mask"], image)
    assert fused.shape == text.shape
    # image_index shares each image's keys/values and equals explicit repetition
    index = torch.tensor([1, 1])
    shared = model.fuse(text, tiny_inputs["attention_mask"], image, image_index=index)
    torch.testing.assert_close(shared, model.fuse(text, tiny_inputs["attention_mask"], image[index]))
    # the image mask hides tokens: changing hidden image tokens does not change the output
    mask = torch.zeros(2, 1 + tiny_config.num_patches, dtype=torch.long)
    mask[:, :10] = 1
    perturbed = image.clone()
    perturbed[:, 10:] += 5.0
    torch.testing.assert_close(
        model.fuse(text, tiny_inputs["attention_mask"], image, mask),
        model.fuse(text, tiny_inputs["attention_mask"], perturbed, mask),
    )
    full = model.fuse(text, tiny_inputs["attention_mask"], image, return_dict=True, output_attentions=True)
    assert len(full.cross_attentions) == tiny_config.text_config.num_fusion_layers
    assert full.cross_attentions[0].shape == (2, tiny_config.text_config.num_attention_heads, 7, 65)


def test_eager_and_sdpa_agree(tiny_config, tiny_inputs):
    eager = XVLMModel.from_pretrained(
        None, config=tiny_config, state_dict=XVLMModel(tiny_config).state_dict(), attn_implementation="eager"
    )
    sdpa = XVLMModel(tiny_config)
    sdpa.load_state_dict(eager.state_dict())
    sdpa.set_attn_implementation("sdpa")
    eager.eval(), sdpa.eval()
    assert eager.text_model.encoder.layer[0].attention.self.config._attn_implementation == "eager"
    assert sdpa.text_model.encoder.layer[0].attention.self.config._attn_implementation == "sdpa"
    a, b = eager(**tiny_inputs), sdpa(**tiny_inputs)
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image, atol=1e-5, rtol=0)
    image = a.vision_model_output.last_hidden_state
    text = a.text_model_output.last_hidden_state
    fe = eager.fuse(text, tiny_inputs["attention_mask"], image)
    fs = sdpa.fuse(text, tiny_inputs["attention_mask"], image)
    assert (fe - fs).abs().max() <= 1e-5


def test_set_attn_implementation_switches_every_tower(tiny_config):
    model = XVLMModel(tiny_config)
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.text_model.encoder.layer[-1].crossattention.self.config._attn_implementation == implementation
        swin_attention = model.vision_model.encoder.layers[0].blocks[0].attention
        assert swin_attention.config._attn_implementation == implementation


def _dispatch_recorder(monkeypatch):
    """Record which kernel `sdpa_where_it_pays_forward` picks (the originals still run)."""
    import modeling_xvlm.attention as module

    calls = []
    for name in ("eager_attention_forward", "sdpa_attention_forward"):
        original = getattr(module, name)

        def record(*args, _name=name, _original=original, **kwargs):
            calls.append(_name.split("_")[0])
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, record)
    return calls


@pytest.mark.parametrize(
    "grad, dropout, dtype, mask_grad, expected",
    [
        (False, 0.0, torch.float32, False, "sdpa"),  # inference: SDPA
        (False, 0.0, torch.bfloat16, False, "sdpa"),
        (True, 0.0, torch.float32, False, "sdpa"),  # fp32 training without dropout: the fused kernel pays
        (True, 0.1, torch.float32, False, "eager"),  # dropout: SDPA would fall back to its math kernel
        (True, 0.0, torch.float32, True, "eager"),  # a mask that needs a gradient (Swin's position bias)
        (True, 0.0, torch.bfloat16, False, "eager"),  # bf16 backward
    ],
)
def test_sdpa_where_it_pays_dispatch(monkeypatch, grad, dropout, dtype, mask_grad, expected):
    from modeling_xvlm.attention import sdpa_where_it_pays_forward

    calls = _dispatch_recorder(monkeypatch)
    module = torch.nn.Module()
    module.is_causal = False
    module.train(grad)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=dtype, requires_grad=grad) for _ in range(3))
    mask = torch.zeros(1, 3, 5, 5, dtype=dtype, requires_grad=mask_grad)
    with torch.set_grad_enabled(grad):
        out, _ = sdpa_where_it_pays_forward(module, q, k, v, mask, scaling=0.5, dropout=dropout)
    assert calls == [expected]
    assert out.shape == (2, 5, 3, 4)
    if dropout == 0:
        reference = F.softmax((q.float() @ k.float().transpose(-1, -2)) * 0.5, dim=-1) @ v.float()
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), reference.transpose(1, 2), atol=tolerance, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_xvlm_swin_attention_equals_transformers_swin(tiny_inputs, implementation):
    """`XVLMSwinAttention` only changes the kernel dispatch: outputs and gradients equal transformers' Swin."""
    import copy

    from transformers.models.swin.modeling_swin import SwinAttention

    from modeling_xvlm.modeling_xvlm import XVLMSwinAttention

    torch.manual_seed(0)
    config = XVLMConfig.from_preset("tiny", vision_config={"depths": [2, 2]})  # blocks 2 and 4: shifted windows
    ours = XVLMModel(config).vision_model
    assert any(isinstance(m, XVLMSwinAttention) for m in ours.modules())
    assert any(block.shift_size > 0 for stage in ours.encoder.layers for block in stage.blocks)
    theirs = copy.deepcopy(ours)
    for module in theirs.modules():
        if isinstance(module, XVLMSwinAttention):
            module.__class__ = SwinAttention
    results = []
    for swin in (ours, theirs):
        swin.set_attn_implementation(implementation)
        swin.train()
        swin.zero_grad(set_to_none=True)
        out = swin(tiny_inputs["pixel_values"]).last_hidden_state
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in swin.named_parameters() if p.grad is not None}))
    (ours_out, ours_grads), (theirs_out, theirs_grads) = results
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=0)
    assert ours_grads.keys() == theirs_grads.keys()
    assert any("relative_position_bias_table" in name for name in ours_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_does_not_change_real_tokens(model, tiny_inputs):
    ids = tiny_inputs["input_ids"][:1, :5]
    mask = torch.ones(1, 5, dtype=torch.long)
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    short = model.get_text_features(ids, mask)
    long = model.get_text_features(padded_ids, padded_mask)
    torch.testing.assert_close(short.last_hidden_state, long.last_hidden_state[:, :5], atol=1e-6, rtol=0)
    torch.testing.assert_close(short.pooler_output, long.pooler_output, atol=1e-6, rtol=0)
    image = model.get_image_features(tiny_inputs["pixel_values"][:1]).last_hidden_state
    fused_short = model.fuse(short.last_hidden_state, mask, image)
    fused_long = model.fuse(long.last_hidden_state, padded_mask, image)
    torch.testing.assert_close(fused_short, fused_long[:, :5], atol=1e-6, rtol=0)


def test_batch_independence(model, tiny_inputs):
    full = model(**tiny_inputs)
    single = model(**{k: v[:1] for k, v in tiny_inputs.items()})
    torch.testing.assert_close(single.image_embeds, full.image_embeds[:1], atol=1e-6, rtol=0)
    torch.testing.assert_close(single.logits_per_image, full.logits_per_image[:1, :1], atol=1e-5, rtol=0)


def test_save_load_round_trip(model, tiny_inputs, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = XVLMModel.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(auto, XVLMModel)
    expected = model(**tiny_inputs).logits_per_image
    torch.testing.assert_close(loaded(**tiny_inputs).logits_per_image, expected, atol=0, rtol=0)
    torch.testing.assert_close(auto(**tiny_inputs).logits_per_image, expected, atol=0, rtol=0)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_dtype_and_device_map_loading(model, tiny_inputs, tmp_path):
    model.save_pretrained(tmp_path)
    bf16 = XVLMModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu").eval()
    assert bf16.vision_proj.weight.dtype == torch.bfloat16
    out = bf16(**{**tiny_inputs, "pixel_values": tiny_inputs["pixel_values"].to(torch.bfloat16)})
    assert out.image_embeds.dtype == torch.bfloat16
    cosine = (out.image_embeds.float() * model(**tiny_inputs).image_embeds).sum(-1)
    assert bool((cosine > 0.99).all())


def test_missing_weights_are_initialised(tiny_config):
    # Loading with no weights must initialise every parameter and buffer as __init__ does (meta-device path).
    model = XVLMModel.from_pretrained(None, config=tiny_config, state_dict={})
    state = model.state_dict()
    assert float(model.temp.detach()) == pytest.approx(tiny_config.temperature_init)
    torch.testing.assert_close(model.text_model.embeddings.position_ids[0], torch.arange(64))
    for name, value in state.items():
        assert torch.isfinite(value.float()).all(), name
        if name.endswith("LayerNorm.weight") or name.endswith("layernorm_before.weight"):
            torch.testing.assert_close(value, torch.ones_like(value), msg=name)
        elif name.endswith(".bias") and "text_model" in name:
            torch.testing.assert_close(value, torch.zeros_like(value), msg=name)
    std = model.text_model.encoder.layer[0].intermediate.dense.weight.std().item()
    assert std == pytest.approx(tiny_config.text_config.initializer_range, rel=0.2)


def test_gradient_checkpointing_gives_same_gradients(tiny_config, tiny_inputs):
    tiny_config.text_config.hidden_dropout_prob = 0.0
    tiny_config.text_config.attention_probs_dropout_prob = 0.0
    model = XVLMModel(tiny_config).train()

    def grads():
        model.zero_grad()
        out = model(**tiny_inputs, return_loss=True)
        image = out.vision_model_output.last_hidden_state
        fused = model.fuse(out.text_model_output.last_hidden_state, tiny_inputs["attention_mask"], image)
        (out.loss + fused.pow(2).mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.text_model.encoder.layer[0].gradient_checkpointing
    checkpointed = grads()
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(reference[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(n.startswith("text_model.encoder.layer.1.crossattention") for n in reference)


def test_input_embeddings_and_resize(model):
    assert model.get_input_embeddings() is model.text_model.embeddings.word_embeddings
    model.resize_token_embeddings(140)
    assert model.get_input_embeddings().num_embeddings == 140
    assert model.config.get_text_config().vocab_size == 140
    model.enable_input_require_grads()
    model.disable_input_require_grads()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x: m.get_image_features(torch.randn(1, 3, 32, 32)), "built for 64x64"),
        (lambda m, x: m.get_image_features(torch.randn(1, 64, 64)), "must have shape"),
        (lambda m, x: m(x["pixel_values"][:1], x["input_ids"], x["attention_mask"], return_loss=True), "aligned"),
        (lambda m, x: m.get_text_features(x["input_ids"], x["attention_mask"][:, :3]), "attention_mask shape"),
        (
            lambda m, x: m.get_region_features(x["pixel_values"], torch.ones(2, 10), torch.tensor([0, 1])),
            "region_masks must have shape",
        ),
        (
            lambda m, x: m.get_region_features(x["pixel_values"], torch.ones(2, 65), torch.tensor([0, 5])),
            "image_index values",
        ),
        (
            lambda m, x: m.get_region_features(
                x["pixel_values"], torch.cat([torch.ones(1, 1), torch.zeros(1, 64)], 1), torch.tensor([0])
            ),
            "select no patch",
        ),
        (
            lambda m, x: m.fuse(torch.randn(2, 7, 32), None, torch.randn(3, 65, 32)),
            "got 2 texts but 3 images",
        ),
        (
            lambda m, x: m.fuse(torch.randn(2, 7, 32), None, torch.randn(2, 65, 32), torch.ones(2, 64)),
            "image_attention_mask has shape",
        ),
        (lambda m, x: m.fuse(torch.randn(2, 7, 32), None, torch.randn(2, 65, 16)), "encoder_width"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, tiny_inputs, call, match):
    with pytest.raises(ValueError, match=match):
        call(model, tiny_inputs)


def test_from_vision_text_pretrained(tmp_path):
    swin_config = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    SwinModel(swin_config).save_pretrained(tmp_path / "swin")
    bert_config = BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )
    bert = BertForMaskedLM(bert_config)
    bert.save_pretrained(tmp_path / "bert")
    model = XVLMModel.from_vision_text_pretrained(str(tmp_path / "swin"), str(tmp_path / "bert"))
    assert model.config.text_config.fusion_layer == 1 and model.config.vision_width == 32
    swin_state = SwinModel.from_pretrained(tmp_path / "swin", add_pooling_layer=False).state_dict()
    for key, value in swin_state.items():
        torch.testing.assert_close(model.vision_model.state_dict()[key], value, msg=key)
    bert_state = bert.state_dict()
    ours = model.text_model.state_dict()
    for key in ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.1.attention.output.LayerNorm.weight", "encoder.layer.1.output.dense.bias"]:
        torch.testing.assert_close(ours[key], bert_state["bert." + key], msg=key)
    new = set(model.newly_initialized_keys)
    assert {"temp", "vision_proj.weight", "text_proj.bias"} <= new
    assert "text_model.encoder.layer.1.crossattention.self.key.weight" in new
    assert not any("attention.self.query" in k and "crossattention" not in k for k in new)
    assert not any(k.startswith("vision_model.") for k in new)


# -- input checks shared by every head's forward (one helper each: pixels, token ids, empty batches) ---------------


def _every_head() -> list:
    from modeling_xvlm import (
        XVLMForConditionalGeneration,
        XVLMForGrounding,
        XVLMForImagesAndTextClassification,
        XVLMForPretraining,
        XVLMForQuestionAnswering,
        XVLMForRetrieval,
    )
    from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config

    config = XVLMConfig.from_preset("tiny")
    nlvr = nlvr2_config(XVLMConfig.from_preset("tiny", text_config={"num_hidden_layers": 3}))
    return [("base", XVLMModel(config)), ("retrieval", XVLMForRetrieval(config)),
            ("grounding", XVLMForGrounding(config)), ("pretraining", XVLMForPretraining(config)),
            ("vqa", XVLMForQuestionAnswering(config)), ("nlvr2", XVLMForImagesAndTextClassification(nlvr)),
            ("captioning", XVLMForConditionalGeneration(config))]


@pytest.fixture(scope="module")
def every_head():
    return [(name, model.eval()) for name, model in _every_head()]


def _head_inputs(name: str, tiny_inputs: dict) -> dict:
    batch = dict(tiny_inputs)
    if name == "nlvr2":  # (B, 2, 3, H, W) image pairs
        batch["pixel_values"] = torch.stack([batch["pixel_values"], batch["pixel_values"].flip(0)], dim=1)
    return batch


def test_every_head_rejects_out_of_vocabulary_token_ids(every_head, tiny_inputs):
    for name, model in every_head:
        batch = _head_inputs(name, tiny_inputs)
        vocab = model.config.text_config.vocab_size
        bad = batch["input_ids"].clone()
        bad[0, 1] = vocab + 3
        with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, {vocab}\).*{vocab + 3}"):
            model(**{**batch, "input_ids": bad})
        bad[0, 1] = -1
        with pytest.raises(ValueError, match="token ids"):
            model(**{**batch, "input_ids": bad})
        with pytest.raises(TypeError, match="integer token ids"):
            model(**{**batch, "input_ids": batch["input_ids"].float()})


def test_every_head_rejects_an_empty_batch(every_head, tiny_inputs):
    for name, model in every_head:
        batch = _head_inputs(name, tiny_inputs)
        empty = {**batch, "pixel_values": batch["pixel_values"][:0], "input_ids": batch["input_ids"][:0],
                 "attention_mask": batch["attention_mask"][:0]}
        with pytest.raises(ValueError, match="empty batch"):
            model(**empty)


def test_every_head_rejects_integer_pixels_and_casts_other_float_dtypes(every_head, tiny_inputs):
    for name, model in every_head:
        batch = _head_inputs(name, tiny_inputs)
        raw = (batch["pixel_values"] * 50 + 128).clamp(0, 255).to(torch.uint8)
        with pytest.raises(TypeError, match="XVLMProcessor"):
            model(**{**batch, "pixel_values": raw})
        with pytest.raises(ValueError, match="NaN or infinite"):
            model(**{**batch, "pixel_values": batch["pixel_values"].clone().fill_(float("nan"))})
        with torch.no_grad():  # float64 pixels into a float32 model: the documented cast, same result
            reference, cast = model(**batch), model(**{**batch, "pixel_values": batch["pixel_values"].double()})
        first = next(k for k, v in reference.items() if isinstance(v, torch.Tensor))
        torch.testing.assert_close(cast[first], reference[first], msg=name)


def test_region_masks_must_be_binary(tiny_config):
    model = XVLMModel(tiny_config).eval()
    pixel_values = torch.randn(1, 3, tiny_config.image_size, tiny_config.image_size)
    masks = torch.ones(2, 1 + tiny_config.num_patches)
    masks[1, 5] = 0.5
    with pytest.raises(ValueError, match="region_masks must be binary"):
        model.get_region_features(pixel_values, masks, torch.tensor([0, 0]))
    masks[1, 5] = 2.0
    with pytest.raises(ValueError, match="region_masks must be binary"):
        model.get_region_features(pixel_values, masks, torch.tensor([0, 0]))
    masks[1, 5] = 1.0
    assert model.get_region_features(pixel_values, masks, torch.tensor([0, 0])).pooler_output.shape[0] == 2
