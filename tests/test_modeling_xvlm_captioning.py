"""XVLMForConditionalGeneration: the official caption loss (prompt excluded, exact label smoothing), the official
transformers-4.12.5 beam search against an independent uncached reference, the stock switch, greedy decodings,
the pre-training initialisation and saving."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling_xvlm import XVLMConfig, XVLMForPretraining, XVLMModel
from modeling_xvlm.modeling_xvlm_captioning import (
    DEFAULT_LABEL_SMOOTHING,
    XVLMForConditionalGeneration,
    caption_labels,
    captioning_decoder_config,
)
from modeling_xvlm.official_generation import official_beam_search

sys.path.insert(0, os.path.dirname(__file__))

from official_captioning_reference import beam_search_4125, greedy_5x, oscar_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

CLS, SEP, PAD = 2, 3, 0
PROMPT = [CLS, 16, 5, 8]  # "[CLS] a picture of" in the tiny vocab: 4 tokens, as the official prompt


def _config(**kwargs) -> XVLMConfig:
    text = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "bos_token_id": CLS, "eos_token_id": SEP}
    text.update(kwargs.pop("text_config", {}))
    # Vision width 16 != text width 32, as in X-VLM-base (1024 vs 768).
    return XVLMConfig.from_preset("tiny", text_config=text, vision_config={"embed_dim": 8}, **kwargs)


def _model(seed: int = 0, sep_bias: float = 0.0) -> XVLMForConditionalGeneration:
    """A random captioner with spread-out logits (init std 0.2) so that images matter; `sep_bias` makes [SEP]
    a frequent candidate, which exercises the hypothesis bookkeeping."""
    torch.manual_seed(seed)
    config = _config(initializer_range=0.2, text_config={"initializer_range": 0.2})
    model = XVLMForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.text_decoder.lm_head.decoder.bias[SEP] += sep_bias
    return model


@pytest.fixture
def model() -> XVLMForConditionalGeneration:
    torch.manual_seed(0)
    return XVLMForConditionalGeneration(_config()).eval()


def _pixels(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _prompts(n: int) -> torch.Tensor:
    return torch.tensor([PROMPT] * n)


def _captions() -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] a picture of caption [SEP]` padded, and the mask."""
    rows = [PROMPT + [40, 41, 42, SEP], PROMPT + [43, SEP]]
    ids = torch.tensor([r + [PAD] * (8 - len(r)) for r in rows])
    return ids, (ids != PAD).long()


def _until_sep(row: torch.Tensor) -> list[int]:
    tokens = row.tolist()
    return tokens[: tokens.index(SEP) + 1] if SEP in tokens else tokens


def _strip_pad(row: torch.Tensor, length: int) -> list[int]:
    tokens = row.tolist()
    assert all(t == PAD for t in tokens[length:])
    return tokens[:length]


# -- structure ----------------------------------------------------------------------------------------------------
def test_the_decoder_is_the_whole_text_stack_run_causally(model):
    config = model.config
    decoder = captioning_decoder_config(config)
    assert decoder.is_decoder and decoder.use_cache
    assert decoder.fusion_layer == config.text_config.fusion_layer
    assert decoder.num_hidden_layers == config.text_config.num_hidden_layers
    assert decoder.encoder_width == config.vision_width != config.text_config.hidden_size
    layers = model.text_decoder.text_model.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [False, True]
    assert layers[1].crossattention.self.key.in_features == config.vision_width
    head = model.text_decoder
    assert head.lm_head.decoder.weight is head.text_model.embeddings.word_embeddings.weight
    # No text encoder: the checkpoint is vision_model.* and text_decoder.* only (official: 627 keys at base).
    assert {key.split(".")[0] for key in model.state_dict()} == {"vision_model", "text_decoder"}


# -- loss ---------------------------------------------------------------------------------------------------------
def _official_smoothed_loss(logits: torch.Tensor, ids: torch.Tensor, first_target: int, eps: float) -> torch.Tensor:
    """LabelSmoothSoftmaxCEV1 written out: one-hot of 1 - eps on the target and eps / V elsewhere, over the
    predictions of positions first_target.. that are not padding, mean over them."""
    vocab = logits.shape[-1]
    terms = []
    for b in range(ids.shape[0]):
        for t in range(first_target, ids.shape[1]):
            if ids[b, t] == PAD:
                continue
            weights = torch.full((vocab,), eps / vocab)
            weights[ids[b, t]] = 1 - eps
            terms.append(-(weights * logits[b, t - 1].log_softmax(-1)).sum())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("smoothing", [DEFAULT_LABEL_SMOOTHING, 0.0, 0.3])
def test_loss_is_the_official_smoothed_next_token_loss_without_prompt_and_padding(model, smoothing):
    ids, mask = _captions()
    labels = caption_labels(ids, mask, prompt_length=4)
    assert bool((labels[:, :4] == -100).all()) and labels[1, 6:].tolist() == [-100, -100]
    kwargs = {} if smoothing == DEFAULT_LABEL_SMOOTHING else {"smoothing": smoothing}
    out = model(pixel_values=_pixels(2), input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    # The first target is the token after the prompt (position 4).
    expected = _official_smoothed_loss(out.logits, ids, first_target=4, eps=smoothing)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    if smoothing:  # torch's label_smoothing puts 1 - eps + eps / V on the target: not the official loss
        shifted, targets = out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        torch_ls = F.cross_entropy(shifted, targets, label_smoothing=smoothing)
        assert not torch.allclose(out.loss, torch_ls, atol=1e-4)


def test_loss_smoothing_follows_the_config_and_return_loss_without_labels(model):
    ids, mask = _captions()
    pixels = _pixels(2)
    model.config.label_smoothing = 0.0  # the domain pre-training setting
    plain = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, return_loss=True)
    # No labels: every caption token after [CLS] is a target (domain pre-training `[CLS] caption [SEP]`).
    assert torch.allclose(plain.loss, _official_smoothed_loss(plain.logits, ids, first_target=1, eps=0.0), atol=1e-6)
    pad_as_label = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.allclose(pad_as_label.loss, plain.loss, atol=1e-7)  # pad ids in labels are ignored


def test_loss_rule_and_bad_inputs(model):
    ids, mask = _captions()
    pixels = _pixels(2)
    labels = caption_labels(ids, mask, prompt_length=4)
    assert model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).loss is not None
    assert model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, return_loss=False).loss is None
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    assert out.loss is None and out.logits.shape == (2, 8, 128) and out.image_embeds.shape == (2, 65, 16)
    as_tuple = model(pixel_values=pixels, input_ids=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.allclose(as_tuple[0], model(pixel_values=pixels, input_ids=ids).logits)
    with pytest.raises(TypeError, match="caption_ids"):
        model(pixel_values=pixels, input_ids=ids, caption_ids=ids)
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(pixel_values=pixels, input_ids=ids, labels=labels[:, :5])
    with pytest.raises(ValueError, match="images for"):
        model(pixel_values=pixels[:1], input_ids=ids)
    with pytest.raises(ValueError, match="label_smoothing"):
        model(pixel_values=pixels, input_ids=ids, labels=labels, smoothing=1.5)


# -- the official beam search ---------------------------------------------------------------------------------------
SETTINGS = [  # (sep_bias, max_length, min_length): official lengths, short captions, truncation, min_length
    (0.0, 20, 5),
    (1.5, 12, 5),
    (2.5, 10, 0),
    (3.0, 9, 7),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_beam_search_equals_the_uncached_4125_reference(seed):
    pixels, prompts = _pixels(3, seed=seed + 10), _prompts(3)
    stock_differs = False
    for sep_bias, max_length, min_length in SETTINGS:
        model = _model(seed, sep_bias)
        out = model.generate(
            pixels, prompts, max_length=max_length, min_length=min_length, num_return_sequences=2,
            return_dict_in_generate=True,
        )
        images = model.encode_image(pixels).last_hidden_state
        reference = beam_search_4125(
            model.text_decoder, prompts, images, num_beams=3, max_length=max_length, min_length=min_length,
            eos=SEP, pad=PAD, num_return_sequences=2,
        )
        expected = [hyp for image in reference for hyp in image]
        assert out.sequences.shape[0] == 6
        for row, (tokens, score) in zip(range(6), expected):
            assert _strip_pad(out.sequences[row], len(tokens)) == tokens
            assert abs(out.sequences_scores[row].item() - score) < 1e-5
        lengths = {"max_length": max_length, "min_length": min_length}
        stock = model.generate(pixels, prompts, official_beam_scoring=False, **lengths)
        official = model.generate(pixels, prompts, **lengths)
        stock_differs |= any(_until_sep(a) != _until_sep(b) for a, b in zip(official, stock))
    # transformers 5 scores hypotheses over generated tokens + [SEP]: other captions on these models.
    assert stock_differs


def test_defaults_are_the_official_decoding_and_the_switch_is_stock_generate():
    model = _model(0, sep_bias=1.5)
    pixels, prompts = _pixels(2), _prompts(2)
    config = model.generation_config
    assert (config.num_beams, config.max_length, config.min_length) == (3, 20, 5)
    official = model.generate(pixels, prompts)
    images = model.encode_image(pixels).last_hidden_state
    reference = beam_search_4125(
        model.text_decoder, prompts, images, num_beams=3, max_length=20, min_length=5, eos=SEP, pad=PAD
    )
    for row, image in zip(official, reference):
        assert _strip_pad(row, len(image[0][0])) == image[0][0]
    penalised = model.generate(pixels, prompts, repetition_penalty=1.5)
    reference = beam_search_4125(
        model.text_decoder, prompts, images, num_beams=3, max_length=20, min_length=5, eos=SEP, pad=PAD,
        repetition_penalty=1.5,
    )
    for row, image in zip(penalised, reference):
        assert _strip_pad(row, len(image[0][0])) == image[0][0]
    assert not torch.equal(penalised, official)
    stock = model.generate(pixels, prompts, official_beam_scoring=False)
    plain = model.text_decoder.generate(
        input_ids=prompts, encoder_hidden_states=images, num_beams=3, max_length=20, min_length=5, eos_token_id=SEP,
        pad_token_id=PAD,
    )
    assert torch.equal(stock, plain)


def test_kv_cache_batching_and_min_length():
    model = _model(1, sep_bias=3.0)
    pixels, prompts = _pixels(2), _prompts(2)
    cached = model.generate(pixels, prompts, min_length=7, max_length=12)
    uncached = model.generate(pixels, prompts, min_length=7, max_length=12, use_cache=False)
    assert torch.equal(cached, uncached)
    for b in range(2):  # each image alone gives its caption of the batch
        alone = model.generate(pixels[b : b + 1], prompts[b : b + 1], min_length=7, max_length=12)
        assert _until_sep(alone[0]) == _until_sep(cached[b])
    # min_length counts the prompt: [SEP] never comes before position 7, although it is favoured.
    for row in cached:
        assert SEP not in row[:7].tolist()
    assert any(_until_sep(row)[-1] == SEP for row in cached)
    stock = model.generate(pixels, prompts, min_length=7, max_length=12, official_beam_scoring=False)
    assert all(SEP not in row[:7].tolist() for row in stock)


class _RepeatedImages:
    """The decoder fed the image sequence repeated per beam (the official layout, before the image index)."""

    def __init__(self, decoder):
        self.decoder = decoder

    def __call__(self, *, encoder_hidden_states, encoder_index=None, **kwargs):
        return self.decoder(encoder_hidden_states=encoder_hidden_states[encoder_index], **kwargs)


@pytest.mark.parametrize("use_cache", [True, False])
def test_beams_read_each_image_once_with_the_repeated_images_tokens_and_scores(use_cache):
    """The beams of an image read its sequence through an index: its cross-attention keys/values are projected
    once per image (with the cache: in the first step only), and the hypotheses and scores are those of the image
    repeated per beam, with and without an image mask."""
    pixels, prompts = _pixels(3, seed=5), _prompts(3)
    for sep_bias, max_length, min_length in SETTINGS[:3]:
        model = _model(2, sep_bias)
        images = model.encode_image(pixels).last_hidden_state
        image_mask = torch.ones(images.shape[:2], dtype=torch.long)
        image_mask[1, 5:] = 0
        for mask in (None, image_mask):
            projected = []
            key = model.text_decoder.text_model.encoder.layer[1].crossattention.self.key
            hook = key.register_forward_hook(lambda _m, args, _o: projected.append(args[0].shape[0]))
            options = dict(encoder_attention_mask=mask, eos_token_id=SEP, pad_token_id=PAD, num_beams=3,
                           max_length=max_length, min_length=min_length, num_return_sequences=2, use_cache=use_cache)
            ids, scores = official_beam_search(model.text_decoder, prompts, images, **options)
            hook.remove()
            assert set(projected) == {3} and (len(projected) == 1) == use_cache
            reference_ids, reference_scores = official_beam_search(
                _RepeatedImages(model.text_decoder), prompts, images, **options
            )
            assert torch.equal(ids, reference_ids)
            assert torch.allclose(scores, reference_scores, atol=1e-6, rtol=0)
        generated = model.generate(pixels, prompts, max_length=max_length, min_length=min_length,
                                   num_return_sequences=2, return_dict_in_generate=True)
        assert torch.equal(generated.sequences, official_beam_search(
            _RepeatedImages(model.text_decoder), prompts, images, **{**options, "encoder_attention_mask": None})[0])


def test_greedy_is_the_stepwise_argmax_and_official_greedy_ignores_min_length():
    model = _model(2, sep_bias=2.0)
    pixels, prompts = _pixels(2), _prompts(2)
    images = model.encode_image(pixels).last_hidden_state
    greedy = model.generate(pixels, prompts, num_beams=1, max_length=12, min_length=6)
    expected = greedy_5x(model.text_decoder, prompts, images, max_length=12, min_length=6, eos=SEP)
    for row, tokens in zip(greedy, expected):
        assert row.tolist()[: len(tokens)] == tokens
    assert all(SEP not in tokens[:6] for tokens in expected)
    # The official greedy=True: no min_length ([SEP] favoured here comes at once), [SEP] forced at max_length.
    found_forced = found_early = False
    for seed in range(3):
        model = _model(seed, sep_bias=1.0)
        images = model.encode_image(pixels).last_hidden_state
        oscar = model.generate(pixels, prompts, official_greedy=True, max_length=9, min_length=8)
        expected = oscar_greedy(model.text_decoder, prompts, images, max_length=9, eos=SEP, pad=PAD)
        assert oscar.shape == (2, 9) and oscar.tolist() == expected
        found_forced |= any(row[-1] == SEP and SEP not in row[4:-1] for row in expected)
        found_early |= any(SEP in row[:8] for row in expected)
    assert found_forced and found_early


def test_prompt_handling_and_bad_options():
    model = _model(0)
    pixels, prompts = _pixels(2), _prompts(2)
    with_sep = torch.cat([prompts, torch.full((2, 1), SEP)], dim=1)
    assert torch.equal(model.generate(pixels, with_sep, max_length=10), model.generate(pixels, prompts, max_length=10))
    no_prompt = model.generate(pixels, max_length=6)
    assert bool((no_prompt[:, 0] == CLS).all()) and no_prompt.shape[1] <= 6
    with pytest.raises(TypeError, match="no_repeat_ngram_size"):
        model.generate(pixels, prompts, no_repeat_ngram_size=2)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(pixels, prompts, max_length=4)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(pixels, prompts, num_return_sequences=4)
    with pytest.raises(ValueError, match="prompts"):
        model.generate(pixels, prompts[:1])
    with pytest.raises(ValueError, match="early_stopping"):
        model.generate(pixels, prompts, early_stopping="never")
    with pytest.raises(ValueError, match="argmax"):
        model.generate(pixels, prompts, official_greedy=True, do_sample=True)
    assert model.generate(pixels, prompts, max_new_tokens=3).shape[1] <= 7
    bare = XVLMForConditionalGeneration(XVLMConfig.from_preset("tiny")).eval()
    with pytest.raises(ValueError, match="eos_token_id"):
        bare.generate(pixels, prompts)
    with pytest.raises(ValueError, match="bos_token_id"):
        bare.generate(pixels)


# -- initialisation and saving ------------------------------------------------------------------------------------
def test_from_pretraining_copies_the_text_stack_and_mlm_head_into_the_decoder(tmp_path):
    torch.manual_seed(0)
    source = XVLMForPretraining(_config())
    source.save_pretrained(tmp_path)
    for origin in (source, tmp_path):
        model = XVLMForConditionalGeneration.from_pretraining(origin)
        assert model.newly_initialized_keys == []
        targets = model.state_dict()
        copied = {f"vision_model.{k}": v for k, v in source.xvlm.vision_model.state_dict().items()}
        copied.update({f"text_decoder.text_model.{k}": v for k, v in source.xvlm.text_model.state_dict().items()})
        copied.update({f"text_decoder.lm_head.{k}": v for k, v in source.mlm_head.state_dict().items()})
        assert set(targets) == set(copied)  # every captioning tensor comes from the pre-training model
        assert all(torch.equal(targets[k], copied[k]) for k in targets)
        decoder = model.text_decoder
        assert decoder.lm_head.decoder.weight is decoder.text_model.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="already a captioning model"):
        XVLMForConditionalGeneration.from_pretraining(model)
    base = XVLMForConditionalGeneration.from_pretraining(source.xvlm)
    head = ("decoder.bias", "transform.LayerNorm.bias", "transform.LayerNorm.weight", "transform.dense.bias",
            "transform.dense.weight")
    assert base.newly_initialized_keys == sorted(f"text_decoder.lm_head.{k}" for k in head)
    assert torch.equal(
        base.text_decoder.text_model.embeddings.word_embeddings.weight,
        source.xvlm.text_model.embeddings.word_embeddings.weight,
    )


def test_save_and_load_keep_outputs_generation_and_the_tie(tmp_path):
    from safetensors import safe_open

    model = _model(0, sep_bias=1.5)
    pixels, prompts = _pixels(2), _prompts(2)
    ids, mask = _captions()
    model.save_pretrained(tmp_path)
    loaded = XVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    decoder = loaded.text_decoder
    assert decoder.lm_head.decoder.weight is decoder.text_model.embeddings.word_embeddings.weight
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "text_decoder.lm_head.decoder.weight" not in keys and not any(k.startswith("xvlm.") for k in keys)
    assert loaded.generation_config.num_beams == 3 and loaded.generation_config.min_length == 5
    labels = caption_labels(ids, mask, prompt_length=4)
    a = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
    b = loaded(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.allclose(a.loss, b.loss, atol=1e-6)
    assert torch.equal(model.generate(pixels, prompts), loaded.generate(pixels, prompts))
    # An XVLMModel checkpoint gives the captioner its image encoder.
    base = XVLMModel(model.config)
    base.save_pretrained(tmp_path / "base")
    from_base = XVLMForConditionalGeneration.from_pretrained(tmp_path / "base")
    assert torch.equal(from_base.vision_model.embeddings.norm.weight, base.vision_model.embeddings.norm.weight)


def test_a_few_steps_fit_a_caption_that_generation_then_produces():
    torch.manual_seed(0)
    model = XVLMForConditionalGeneration(_config()).train()
    ids, mask = _captions()
    pixels = _pixels(2)
    labels = caption_labels(ids, mask, prompt_length=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, smoothing=0.0).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    generated = model.eval().generate(pixels, _prompts(2), min_length=0)
    assert [_until_sep(row) for row in generated] == [_until_sep(row) for row in ids]
