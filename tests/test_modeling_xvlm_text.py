"""The text stack in every mode: bidirectional / causal self-attention, cross-attention of vision or text width,
KV cache, per-layer encoder sequences, tied cross-attention pairs, the tied LM head and generation."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from modeling_xvlm import XVLMTextConfig, XVLMTextLMHeadModel, XVLMTextModel
from modeling_xvlm.modeling_xvlm_text import next_token_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _text_config(**overrides) -> XVLMTextConfig:
    fields = dict(
        vocab_size=40, hidden_size=16, num_hidden_layers=3, fusion_layer=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, encoder_width=12, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    return XVLMTextConfig(**fields)


def _ids(batch: int = 2, length: int = 6, vocab: int = 40) -> torch.Tensor:
    ids = torch.randint(5, vocab, (batch, length))
    ids[:, 0] = 2
    return ids


def test_encoder_is_bidirectional_and_decoder_is_causal():
    for is_decoder in (False, True):
        model = XVLMTextModel(_text_config(is_decoder=is_decoder, num_hidden_layers=2, fusion_layer=1)).eval()
        ids = _ids()
        changed = ids.clone()
        changed[:, 4] = 7 if int(ids[0, 4]) != 7 else 8
        with torch.no_grad():
            a = model(input_ids=ids, use_cache=False).last_hidden_state
            b = model(input_ids=changed, use_cache=False).last_hidden_state
        moved = (a[:, :4] - b[:, :4]).abs().max().item()
        if is_decoder:
            assert moved == 0.0  # positions before 4 cannot see token 4
            assert (a[:, 4] - b[:, 4]).abs().max() > 1e-4
        else:
            assert moved > 1e-4


def test_causal_mask_with_padding_matches_an_explicit_mask():
    model = XVLMTextModel(_text_config(is_decoder=True, num_hidden_layers=2, fusion_layer=1)).eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        # Row 1 without its padding gives the same states at the real positions.
        alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4], use_cache=False).last_hidden_state
    assert torch.allclose(out[1, :4], alone[0], atol=1e-6)


@pytest.mark.parametrize("cross_width", ["vision", "text"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("states_each_step", [True, False])
def test_cache_equals_no_cache(cross_width, implementation, states_each_step):
    """Later steps may pass the encoder states again or only their mask (the keys/values are in the cache);
    either way the padded encoder positions stay masked."""
    hidden = 16
    width = 12 if cross_width == "vision" else hidden  # the VQA decoder reads question states of the text width
    config = _text_config(is_decoder=True, fusion_layer=0, encoder_width=width)
    model = XVLMTextLMHeadModel(config).eval()
    model.set_attn_implementation(implementation)
    ids = _ids(length=7)
    encoder = torch.randn(2, 5, width)
    encoder_mask = torch.ones(2, 5, dtype=torch.long)
    encoder_mask[1, 3:] = 0
    with torch.no_grad():
        full = model(ids, encoder_hidden_states=encoder, encoder_attention_mask=encoder_mask, use_cache=False).logits
        out = model(ids[:, :3], encoder_hidden_states=encoder, encoder_attention_mask=encoder_mask, use_cache=True)
        steps = [out.logits]
        cache = out.cache
        assert cache.get_seq_length() == 3
        for t in range(3, 7):
            out = model(ids[:, t : t + 1], attention_mask=torch.ones(2, t + 1, dtype=torch.long),
                        encoder_hidden_states=encoder if states_each_step else None,
                        encoder_attention_mask=encoder_mask, cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_encoder_index_equals_repeated_encoder_states(implementation):
    """Rows reading their encoder sequence through `encoder_index` (beams of one image) give the logits of the
    repeated sequences, step by step with a reordered cache and without one; each sequence's keys/values are
    projected once and cached per row."""
    config = _text_config(is_decoder=True, fusion_layer=1, encoder_width=12)
    model = XVLMTextLMHeadModel(config).eval()
    model.set_attn_implementation(implementation)
    encoder = torch.randn(2, 5, 12)
    index = torch.tensor([0, 0, 1, 1, 1])
    encoder_mask = torch.ones(5, 5, dtype=torch.long)
    encoder_mask[2:, 3:] = 0  # the second sequence's last two positions are padding
    ids = _ids(batch=5, length=6)
    projected = []
    hook = model.text_model.encoder.layer[1].crossattention.self.key.register_forward_hook(
        lambda _m, args, _o: projected.append(args[0].shape[0])
    )
    with torch.no_grad():
        full = model(ids, encoder_hidden_states=encoder[index], encoder_attention_mask=encoder_mask, use_cache=False)
        shared = model(ids, encoder_hidden_states=encoder, encoder_attention_mask=encoder_mask, encoder_index=index,
                       use_cache=False)
        assert torch.allclose(shared.logits, full.logits, atol=1e-6, rtol=0)
        projected.clear()
        reorder = torch.tensor([1, 0, 4, 2, 2])  # beams continue from others of the same image
        runs = {}
        for name, states, extra in (("repeated", encoder[index], {}), ("indexed", encoder, {"encoder_index": index})):
            out = model(ids[:, :3], encoder_hidden_states=states, encoder_attention_mask=encoder_mask, use_cache=True,
                        **extra)
            logits, cache = [out.logits], out.cache
            for t in range(3, 6):
                cache.self_attention_cache.reorder_cache(reorder)
                out = model(ids[:, t : t + 1], attention_mask=torch.ones(5, t + 1, dtype=torch.long),
                            encoder_hidden_states=states, encoder_attention_mask=encoder_mask, cache=cache,
                            use_cache=True, **extra)
                cache = out.cache
                logits.append(out.logits)
            runs[name] = torch.cat(logits, dim=1)
            assert cache.cross_attention_cache.layers[1].keys.shape[0] == 5  # per row
    hook.remove()
    assert projected == [5, 2]  # repeated: every row once; indexed: each sequence once, both in the first step only
    assert torch.allclose(runs["indexed"], runs["repeated"], atol=1e-6, rtol=0)
    assert (runs["indexed"][:2] - runs["indexed"][2:4]).abs().max() > 1e-4  # the two sequences differ
    with pytest.raises(ValueError, match="image_index"):
        model(ids, encoder_hidden_states=encoder, encoder_index=index[:4], use_cache=False)
    with pytest.raises(ValueError, match="image_index values"):
        model(ids, encoder_hidden_states=encoder, encoder_index=index + 1, use_cache=False)


def test_generate_greedy_and_beam_with_cache_equal_without():
    config = _text_config(is_decoder=True, fusion_layer=1, encoder_width=12)
    model = XVLMTextLMHeadModel(config).eval()
    encoder = torch.randn(2, 5, 12)
    prompt = torch.full((2, 1), 2, dtype=torch.long)
    common = dict(encoder_hidden_states=encoder, max_length=8, min_length=8, pad_token_id=0, eos_token_id=3)
    for extra in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}):
        kwargs = {**common, **extra}  # beam search expands the encoder states per beam itself
        with torch.no_grad():
            cached = model.generate(prompt, use_cache=True, **kwargs)
            uncached = model.generate(prompt, use_cache=False, **kwargs)
        assert cached.shape == (2, 8)
        assert torch.equal(cached, uncached)
    # Greedy decoding is the argmax of the uncached forward at every step.
    with torch.no_grad():
        greedy = model.generate(prompt, use_cache=True, **common)
        logits = model(greedy, encoder_hidden_states=encoder, use_cache=False).logits
    logits[..., 3] = -float("inf")  # min_length forbids [SEP]
    assert torch.equal(greedy[:, 1:], logits[:, :-1].argmax(-1))


def test_per_layer_encoder_sequences():
    config = _text_config(num_hidden_layers=3, fusion_layer=1)  # two cross-attention layers
    model = XVLMTextModel(config).eval()
    text = torch.randn(2, 6, 16)
    first, second = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    with torch.no_grad():
        one = model.fuse(text, None, first).last_hidden_state
        same = model.fuse(text, None, [first, first]).last_hidden_state
        mixed = model.fuse(text, None, [first, second]).last_hidden_state
        layer1, layer2 = model.encoder.layer[1], model.encoder.layer[2]
        by_hand = layer2(layer1(text, None, first), None, second)
    assert torch.equal(one, same)
    assert torch.allclose(mixed, by_hand, atol=1e-6)
    assert (mixed - one).abs().max() > 1e-4
    # Sequences are read cyclically (official): three layers, two images -> first, second, first.
    three = XVLMTextModel(_text_config(num_hidden_layers=4, fusion_layer=1)).eval()
    with torch.no_grad():
        cyclic = three.fuse(text, None, [first, second]).last_hidden_state
        spelled = three.fuse(text, None, [first, second, first]).last_hidden_state
    assert torch.equal(cyclic, spelled)


def test_tied_cross_attention_pairs_survive_save_and_load(tmp_path):
    config = _text_config(num_hidden_layers=5, fusion_layer=1, tie_cross_attention_pairs=True)
    model = XVLMTextModel(config)
    layers = model.encoder.layer
    for a, b in ((1, 2), (3, 4)):
        assert layers[b].crossattention.self.key.weight is layers[a].crossattention.self.key.weight
        assert layers[b].crossattention.self.value.bias is layers[a].crossattention.self.value.bias
        assert layers[b].crossattention.self.query.weight is not layers[a].crossattention.self.query.weight
    assert layers[3].crossattention.self.key.weight is not layers[2].crossattention.self.key.weight
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "encoder.layer.1.crossattention.self.key.weight" in keys
    assert "encoder.layer.2.crossattention.self.key.weight" not in keys  # stored once
    assert "encoder.layer.2.crossattention.self.query.weight" in keys
    loaded = XVLMTextModel.from_pretrained(tmp_path)
    lay = loaded.encoder.layer
    assert lay[2].crossattention.self.key.weight is lay[1].crossattention.self.key.weight
    assert torch.equal(lay[2].crossattention.self.value.weight, layers[1].crossattention.self.value.weight)
    with pytest.raises(ValueError, match="even number"):
        _text_config(num_hidden_layers=4, fusion_layer=1, tie_cross_attention_pairs=True)


def test_lm_head_is_tied_to_its_own_embeddings(tmp_path):
    model = XVLMTextLMHeadModel(_text_config(is_decoder=True))
    assert model.lm_head.decoder.weight is model.text_model.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.decoder.weight" not in set(f.keys())
    loaded = XVLMTextLMHeadModel.from_pretrained(tmp_path)
    assert loaded.lm_head.decoder.weight is loaded.text_model.embeddings.word_embeddings.weight
    assert torch.equal(loaded.lm_head.decoder.weight, model.lm_head.decoder.weight)


def test_next_token_loss_is_the_shifted_cross_entropy():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    per_token = []
    for b in range(2):
        total = 0.0
        for t in range(1, 5):
            if labels[b, t] != -100:
                total += -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
        per_token.append(total)
    expected = torch.stack([torch.as_tensor(v) for v in per_token])
    assert torch.allclose(next_token_loss(logits, labels, reduction="none"), expected, atol=1e-5)
    assert torch.allclose(next_token_loss(logits, labels), expected.sum() / 6, atol=1e-5)
    model = XVLMTextLMHeadModel(_text_config(is_decoder=True, fusion_layer=2, num_hidden_layers=3))
    ids = _ids()
    out = model(ids, labels=ids)
    assert torch.allclose(out.loss, next_token_loss(out.logits, ids), atol=1e-6)


def test_encoder_rejects_a_cache_and_bad_masks():
    model = XVLMTextModel(_text_config())
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="decoder"):
        model(input_ids=_ids(), cache=DynamicCache())
    decoder = XVLMTextModel(_text_config(is_decoder=True, num_hidden_layers=2, fusion_layer=1))
    with pytest.raises(ValueError, match="covers 3 positions"):
        decoder(input_ids=_ids(), attention_mask=torch.ones(2, 3, dtype=torch.long))
