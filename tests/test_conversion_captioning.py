"""Official captioning checkpoints (`model_captioning.py`, and the captioning domain pre-training
`model_captioning_pretrain.py`, same keys): key accounting (627 keys, 212,935,602 parameters at 384 with the tied
LM-head weight counted once), the pre-training -> captioning path of the official loader (`text_encoder.*` ->
`text_decoder.*`), and fp32 parity of the converted `XVLMForConditionalGeneration` with the independent
re-implementation of the official computation (`official_captioning_reference.py` on top of
`official_reference.py`: teacher-forced logits, the loss with and without the official label smoothing, the
official greedy and 4.12.5 beam-search token ids) on official-format state dicts (`official_format.py`)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(__file__))

import official_captioning_reference as cref  # noqa: E402
import official_reference as ref  # noqa: E402
from official_format import (  # noqa: E402
    base_arch,
    official_captioning_loader,
    official_key_shapes,
    official_state_dict,
    official_task_files,
    tiny_arch,
)

from modeling_xvlm import XVLMForConditionalGeneration  # noqa: E402
from modeling_xvlm.conversion import (  # noqa: E402
    NEW_HEADS,
    SOURCE_HEADS,
    ConversionError,
    build_config,
    convert_checkpoint,
    convert_state_dict,
    detect_task,
    head_class,
    load_into_model,
)
from modeling_xvlm.conversion.official_config import OfficialConfig  # noqa: E402
from modeling_xvlm.modeling_xvlm_captioning import CAPTION_PROMPT, caption_labels  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
CLS, SEP, PAD = 2, 3, 0
PROMPT = [CLS, 5, 16, 8]  # "[CLS] a picture of" in the tiny vocab (conftest): 4 tokens, as the official prompt
DECODER = "text_decoder.text_model."
HEAD = "text_decoder.lm_head."
TIED = HEAD + "decoder.weight"


def _official(arch, seed, sep_bias=0.0):
    """A random official captioning state dict; `sep_bias` raises the LM-head bias of [SEP] (both official names of
    it: `cls.predictions.bias` and its alias `decoder.bias`), which makes [SEP] a frequent beam candidate."""
    sd = official_state_dict(arch, "captioning", seed=seed)
    bias = sd["text_decoder.cls.predictions.bias"].clone()
    bias[SEP] += sep_bias
    sd["text_decoder.cls.predictions.bias"] = sd["text_decoder.cls.predictions.decoder.bias"] = bias
    return sd


def _convert_in_memory(sd, arch, image_size=None):
    official = OfficialConfig(text={"num_attention_heads": arch.text_heads}, top={"label_smoothing": 0.1})
    config, inference = build_config(sd, official, image_size=image_size, task="captioning")
    window = config.vision_config.window_size
    same_geometry = window == inference.source_window and config.image_size == inference.source_image
    result = convert_state_dict(sd, "captioning", target_window=None if same_geometry else window, config=config)
    result.config = config
    config.text_config.bos_token_id, config.text_config.eos_token_id = CLS, SEP
    model = head_class("captioning")(config)
    load_into_model(result, model)
    return model.eval(), result


def _spec(arch):
    """The caption decoder is the whole text stack: cross-attention from the fusion layer on."""
    return ref.TextSpec(arch.text_heads, arch.fusion, arch.layers)


def _images(arch, n=3, seed=1):
    return torch.randn(n, 3, arch.image_res, arch.image_res, generator=torch.Generator().manual_seed(seed))


def _captions():
    """`[CLS] a picture of caption [SEP]` padded (official `tokenizer(prompt + caption, padding='longest')`)."""
    rows = [PROMPT + [40, 41, 42, SEP], PROMPT + [43, SEP], PROMPT + [20, 21, 22, 23, 24, SEP]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    return ids, (ids != PAD).long()


def _prompts(n):
    return torch.tensor([PROMPT] * n)


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _strip_pad(row, length):
    tokens = row.tolist()
    assert all(t == PAD for t in tokens[length:]), tokens
    return tokens[:length]


def _check_model_covers(result, model):
    """Every mapped official key lands on a model weight, and every model weight comes from an official key (the
    tied LM-head weight is the word embeddings)."""
    state = model.state_dict()
    targets = {t for ts in result.mapping.values() for t in ts}
    assert targets <= set(state)
    assert set(state) - targets == {TIED}


# ----------------------------------------------------------------------------------------------------------------
# Key accounting
# ----------------------------------------------------------------------------------------------------------------


def _check_key_rules(sd, arch):
    """The official key counts by rule: no text_encoder; the decoder has 6 embedding keys + 16 per layer + 10 per
    layer from the fusion layer on (cross-attention reading the vision width), plus 7 LM-head keys."""
    layers, fusion = arch.layers, arch.fusion
    assert not [k for k in sd if k.startswith("text_encoder.")]
    assert len([k for k in sd if k.startswith("text_decoder.bert.")]) == 6 + 16 * layers + 10 * (layers - fusion)
    assert len([k for k in sd if k.startswith("text_decoder.cls.")]) == 7
    assert f"text_decoder.bert.encoder.layer.{fusion - 1}.crossattention.self.key.weight" not in sd
    assert tuple(sd[f"text_decoder.bert.encoder.layer.{fusion}.crossattention.self.key.weight"].shape) == (
        arch.hidden,
        arch.vision_width,
    )


def test_base_key_accounting_on_meta():
    sd = official_state_dict(base_arch(384), "captioning", device="meta")
    assert len(sd) == 627
    buffers = [k for k in sd if k.endswith(("relative_position_index", "attn_mask", "position_ids"))]
    assert len(buffers) == 36  # 24 position indices, 11 shift masks, the decoder's position_ids
    assert detect_task(sd) == "captioning"
    _check_key_rules(sd, base_arch(384))
    config, inference = build_config(sd, image_size=384, task="captioning")
    assert config.text_config.num_hidden_layers == 12 and config.text_config.fusion_layer == 6
    assert config.text_config.encoder_width == 1024 and config.num_decoder_layers is None
    assert inference.provenance["text.fusion_layer"].startswith("inferred") and "num_decoder_layers" not in inference.top
    result = convert_state_dict(sd, "captioning", target_window=12, config=config)
    assert set(result.mapping) | set(result.dropped) == set(sd)
    assert not set(result.mapping) & set(result.dropped) and not result.new and not result.interpolated
    assert len(result.dropped) == 38  # 36 buffers + the LM head's tied decoder weight and bias
    assert {k for k, r in result.dropped.items() if "tied" in r or "alias" in r} == {
        "text_decoder.cls.predictions.decoder.weight",
        "text_decoder.cls.predictions.decoder.bias",
    }
    assert len(result.state_dict) == len(result.mapping) + 2 * 48  # 48 Swin qkv weights / biases in three parts
    assert {k.split(".")[0] for k in result.state_dict} == {"vision_model", "text_decoder"}
    with torch.device("meta"):
        model = head_class("captioning")(config)
    assert isinstance(model, XVLMForConditionalGeneration)
    load_into_model(result, model)
    _check_model_covers(result, model)
    assert sum(p.numel() for p in model.parameters()) == 212_935_602  # tied LM-head weight counted once


def test_base_domain_pretraining_checkpoint_at_384_on_meta():
    """A 224 captioning domain pre-training checkpoint fine-tuned at 384 (`Captioning.py --load_capt_pretrain`:
    loaded as it is, the Swin tables resized by the official loader)."""
    sd = official_state_dict(base_arch(224), "captioning", device="meta")
    config, _ = build_config(sd, image_size=384, task="captioning")
    assert (config.image_size, config.vision_config.window_size) == (384, 12)
    result = convert_state_dict(sd, "captioning", target_window=12, config=config)
    assert len(result.interpolated) == 24 and set(result.interpolated.values()) == {(7, 12)} and not result.new
    with torch.device("meta"):
        model = head_class("captioning")(config)
    load_into_model(result, model)
    assert sum(p.numel() for p in model.parameters()) == 212_935_602


def test_base_pretraining_checkpoint_into_captioning_on_meta():
    """The official start of caption fine-tuning: a 224 pre-training checkpoint into a 384 captioning model; the
    text stack becomes the decoder, the MLM head its LM head, nothing is new."""
    sd = official_state_dict(base_arch(224), "pretrain", device="meta")
    config, _ = build_config(sd, image_size=384, task="captioning")
    result = convert_state_dict(sd, "captioning", target_window=12, config=config)
    assert len(result.interpolated) == 24 and not result.new
    assert NEW_HEADS[("captioning", "pretrain")] == {"decoder"} and SOURCE_HEADS[("captioning", "pretrain")] == {"mlm"}
    dropped_heads = {k.split(".")[0] for k, reason in result.dropped.items() if "not part of" in reason}
    assert dropped_heads == {"itm_head", "bbox_head", "vision_proj", "text_proj", "temp"}
    assert result.mapping["text_encoder.bert.encoder.layer.8.crossattention.self.key.weight"] == [
        f"{DECODER}encoder.layer.8.crossattention.self.key.weight"
    ]
    assert result.mapping["text_encoder.bert.encoder.layer.2.attention.self.query.weight"] == [
        f"{DECODER}encoder.layer.2.attention.self.query.weight"
    ]
    assert result.mapping["text_encoder.cls.predictions.bias"] == [HEAD + "decoder.bias"]
    assert result.mapping["vision_encoder.layers.2.blocks.3.attn.proj.weight"] == [
        "vision_model.encoder.layers.2.blocks.3.attention.o_proj.weight"
    ]
    assert "text_encoder.* -> text_decoder.*" in result.summary()
    with torch.device("meta"):
        model = head_class("captioning")(config)
    load_into_model(result, model)
    _check_model_covers(result, model)
    assert sum(p.numel() for p in model.parameters()) == 212_935_602


def test_tiny_every_tensor_lands_where_it_should():
    arch = tiny_arch()
    sd = _official(arch, seed=40)
    _check_key_rules(sd, arch)
    assert detect_task(sd) == "captioning"
    model, result = _convert_in_memory(sd, arch)
    _check_model_covers(result, model)
    state = model.state_dict()
    dec, lm = "text_decoder.bert.", "text_decoder.cls.predictions."
    expected = {
        f"{DECODER}encoder.layer.3.crossattention.self.key.weight": f"{dec}encoder.layer.3.crossattention.self.key.weight",
        f"{DECODER}encoder.layer.0.attention.self.value.bias": f"{dec}encoder.layer.0.attention.self.value.bias",
        f"{DECODER}embeddings.position_embeddings.weight": f"{dec}embeddings.position_embeddings.weight",
        f"{DECODER}embeddings.word_embeddings.weight": f"{dec}embeddings.word_embeddings.weight",
        f"{HEAD}transform.dense.weight": f"{lm}transform.dense.weight",
        f"{HEAD}transform.LayerNorm.bias": f"{lm}transform.LayerNorm.bias",
        f"{HEAD}decoder.bias": f"{lm}bias",
        TIED: f"{lm}decoder.weight",
        "vision_model.layernorm.weight": "vision_encoder.norm.weight",
    }
    for ours, official in expected.items():
        assert torch.equal(state[ours], sd[official]), ours
    decoder = model.text_decoder
    assert decoder.lm_head.decoder.weight is decoder.text_model.embeddings.word_embeddings.weight
    layers = decoder.text_model.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [False, False, True, True]
    for source, targets in result.mapping.items():
        joined = torch.cat([state[t].reshape(-1) for t in targets])
        assert torch.equal(joined, sd[source].reshape(-1)), source


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_missing_untied_and_wrong_task_are_errors():
    arch = tiny_arch()
    sd = _official(arch, seed=41)
    for extra in ("text_decoder.cls.seq_relationship.weight", "text_decoder.bert.pooler.dense.weight"):
        with pytest.raises(ConversionError, match=extra.replace(".", r"\.")):
            convert_state_dict(dict(sd, **{extra: torch.zeros(1)}), "captioning")
    # a cross-attention below the fusion layer has no place in the model
    stray = "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight"
    result = convert_state_dict(dict(sd, **{stray: torch.zeros(24, 24)}), "captioning")
    with pytest.raises(ConversionError, match=r"does not have: .*layer\.0\.crossattention"):
        load_into_model(result, head_class("captioning")(build_config(sd, task="captioning")[0]))
    with pytest.raises(ConversionError, match=r"text_decoder\.cls\.predictions\.bias"):
        convert_state_dict({k: v for k, v in sd.items() if k != "text_decoder.cls.predictions.bias"}, "captioning")
    missing = {k: v for k, v in sd.items() if ".layer.1.output.dense." not in k}
    config, _ = build_config(missing, task="captioning")
    result = convert_state_dict(missing, "captioning", config=config)
    with pytest.raises(ConversionError, match=r"text_decoder\.text_model\.encoder\.layer\.1\.output\.dense"):
        load_into_model(result, head_class("captioning")(config))
    untied = dict(sd)
    untied["text_decoder.cls.predictions.decoder.weight"] = untied["text_decoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ConversionError, match="tied"):
        convert_state_dict(untied, "captioning")
    for task in ("retrieval", "vqa", "pretrain"):
        with pytest.raises(ConversionError, match="--task captioning"):
            convert_state_dict(sd, task)
    for source in ("retrieval", "grounding"):
        with pytest.raises(ConversionError, match="captioning domain pre-training\\) or pre-training"):
            convert_state_dict(official_state_dict(arch, source), "captioning")
    for source in ("vqa", "nlvr2"):
        with pytest.raises(ConversionError, match=f"converts with --task {source}"):
            convert_state_dict(official_state_dict(arch, source), "captioning")
    with pytest.raises(ConversionError, match="--task captioning"):
        convert_checkpoint({"model": sd}, task="vqa", log=None)


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official computation
# ----------------------------------------------------------------------------------------------------------------


def test_captioning_parity_logits_and_losses():
    """Teacher-forced logits on `[CLS] a picture of caption [SEP] pad`, the fine-tuning loss (prompt 4 tokens
    masked, official label smoothing 0.1, the converted default) and the domain pre-training loss (no prompt, no
    smoothing) against the official computation on the official state dict."""
    arch = tiny_arch()
    sd = _official(arch, seed=42)
    model, _ = _convert_in_memory(sd, arch)
    assert model.config.label_smoothing == 0.1  # configs/Captioning.yaml
    images = _images(arch)
    ids, atts = _captions()
    diffs = {}
    with torch.no_grad():
        fine = cref.caption_forward(sd, images, ids, atts, _spec(arch), arch.image_res, arch.window, 4, 0.1)
        domain = cref.caption_forward(sd, images, ids, atts, _spec(arch), arch.image_res, arch.window, 0, 0.0)
        out = model(pixel_values=images, input_ids=ids, attention_mask=atts, labels=caption_labels(ids, atts, 4))
        plain = model(pixel_values=images, input_ids=ids, attention_mask=atts, labels=caption_labels(ids, atts, 0),
                      smoothing=0.0)
        default_target = model(pixel_values=images, input_ids=ids, attention_mask=atts, return_loss=True,
                               smoothing=0.0)
        diffs["image_states"] = _max_diff(fine["image_states"], out.image_embeds)
        diffs["logits"] = _max_diff(fine["logits"], out.logits)
        diffs["loss_smoothed_prompt4"] = abs(fine["loss"].item() - out.loss.item())
        diffs["loss_domain_pretraining"] = abs(domain["loss"].item() - plain.loss.item())
        diffs["loss_return_loss"] = abs(domain["loss"].item() - default_target.loss.item())
        # the official smoothing is not torch's (target 1 - s + s / V there)
        torch_smoothed = torch.nn.functional.cross_entropy(
            fine["logits"][:, :-1].reshape(-1, arch.vocab), cref.caption_targets(ids, 4)[:, 1:].reshape(-1),
            label_smoothing=0.1,
        )
    assert out.logits.shape == (3, ids.shape[1], arch.vocab)
    assert abs(torch_smoothed.item() - fine["loss"].item()) > 1e-4
    assert abs(fine["loss"].item() - domain["loss"].item()) > 1e-3
    print(json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    assert all(v <= TOL for v in diffs.values()), diffs


DECODING = [  # (seed, sep_bias, max_length, min_length): official lengths, short captions, truncation
    (43, 0.0, 20, 5),
    (44, 2.0, 12, 5),
    (45, 3.0, 9, 7),
]


@pytest.mark.parametrize("seed,sep_bias,max_length,min_length", DECODING)
def test_official_beam_search_and_greedy_token_ids(seed, sep_bias, max_length, min_length):
    """The converted model's default decoding (official 4.12.5 beam search), `official_greedy=True` (OSCAR greedy)
    and `num_beams=1` give exactly the token ids of the independent decoding references run on the official
    forward over the official state dict (not on the model)."""
    arch = tiny_arch()
    sd = _official(arch, seed, sep_bias)
    model, _ = _convert_in_memory(sd, arch)
    images, prompts = _images(arch, seed=seed), _prompts(3)
    decoder = cref.OfficialCaptionDecoder(sd, _spec(arch))
    with torch.no_grad():
        states = cref.caption_image_states(sd, images, arch.image_res, arch.window)
        lengths = {"max_length": max_length, "min_length": min_length}
        beams = model.generate(images, prompts, num_return_sequences=2, return_dict_in_generate=True, **lengths)
        default = model.generate(images, prompts, **lengths)
        greedy = model.generate(images, prompts, official_greedy=True, max_length=max_length)
        argmax = model.generate(images, prompts, num_beams=1, **lengths)
    reference = cref.beam_search_4125(decoder, prompts, states, num_beams=3, eos=SEP, pad=PAD,
                                      num_return_sequences=2, **lengths)
    expected = [hyp for image in reference for hyp in image]
    for row, (tokens, score) in enumerate(expected):
        assert _strip_pad(beams.sequences[row], len(tokens)) == tokens
        assert abs(beams.sequences_scores[row].item() - score) <= TOL
    for row, image in zip(default, reference):
        assert _strip_pad(row, len(image[0][0])) == image[0][0]
    assert greedy.tolist() == cref.oscar_greedy(decoder, prompts, states, max_length=max_length, eos=SEP, pad=PAD)
    for row, tokens in zip(argmax, cref.greedy_5x(decoder, prompts, states, eos=SEP, **lengths)):
        assert _strip_pad(row, len(tokens)) == tokens
    assert all(SEP not in tokens[:min_length] for tokens, _ in expected)  # min_length counts the prompt
    assert len({tuple(tokens) for tokens, _ in expected}) > 1


# ----------------------------------------------------------------------------------------------------------------
# Pre-training -> captioning (the official loader)
# ----------------------------------------------------------------------------------------------------------------


def _our_name(key):
    """Our in-memory name of an official captioning key."""
    if key.startswith("text_decoder.bert."):
        return DECODER + key[len("text_decoder.bert.") :]
    rest = key[len("text_decoder.cls.predictions.") :]
    return HEAD + ("decoder.bias" if rest == "bias" else rest)


def test_pretraining_to_captioning_gives_the_official_copied_parameters(tmp_path):
    """Converting a pre-training checkpoint for captioning = the official captioning loader (`text_encoder.*` ->
    `text_decoder.*`) followed by `load_state_dict(strict=False)`: every official captioning text key is filled and
    equals the converted tensor; nothing is new; the forward matches the official forward on that state.
    `XVLMForConditionalGeneration.from_pretraining` of the converted pre-training model gives the same weights."""
    arch = tiny_arch()
    sd = official_state_dict(arch, "pretrain", seed=46)
    assert detect_task(sd) == "pretrain"
    yaml_path = official_task_files(tmp_path, arch)
    model, result = convert_checkpoint({"model": sd}, task="captioning", config=yaml_path, log=None)
    assert not result.new and model.config.label_smoothing is None
    official = official_captioning_loader(sd)
    caption_keys = official_key_shapes(arch, "captioning")
    text_keys = {k for k in caption_keys if k.startswith("text_decoder.")}
    assert text_keys <= set(official)  # the official loader fills every decoder key: nothing stays new
    state = model.state_dict()
    compared = 0
    for key in text_keys:
        if key.endswith("position_ids") or key.endswith(("decoder.weight", "decoder.bias")):
            continue  # a non-persistent buffer here; tied aliases (checked below)
        assert torch.equal(state[_our_name(key)], official[key]), key
        compared += 1
    assert compared == len(text_keys) - 3
    assert torch.equal(state[TIED], official["text_decoder.cls.predictions.decoder.weight"])
    assert torch.equal(state[HEAD + "decoder.bias"], official["text_decoder.cls.predictions.decoder.bias"])
    # the same through the model API, from the converted pre-training model
    pretrained, _ = convert_checkpoint({"model": sd}, task="pretrain", config=yaml_path, log=None)
    from_api = XVLMForConditionalGeneration.from_pretraining(pretrained)
    assert from_api.newly_initialized_keys == []
    api_state = from_api.state_dict()
    assert set(api_state) == set(state)
    for name, tensor in state.items():
        assert torch.equal(api_state[name], tensor), name
    # the official forward on the official loader's state
    loaded = {k: official[k] for k in caption_keys}
    images = _images(arch, seed=5)
    ids, atts = _captions()
    with torch.no_grad():
        r = cref.caption_forward(loaded, images, ids, atts, _spec(arch), arch.image_res, arch.window, 4, 0.1)
        kwargs = {"pixel_values": images, "input_ids": ids, "attention_mask": atts,
                  "labels": caption_labels(ids, atts, 4)}
        out, api = model.eval()(**kwargs), from_api.eval()(**kwargs)
    assert _max_diff(r["logits"], out.logits) <= TOL and abs(r["loss"].item() - out.loss.item()) <= TOL
    assert torch.equal(out.logits, api.logits)


# ----------------------------------------------------------------------------------------------------------------
# Configuration, command line, folder, round trip
# ----------------------------------------------------------------------------------------------------------------


def test_label_smoothing_and_decoding_follow_the_official_config(tmp_path):
    """`configs/Captioning.yaml` (label_smoothing 0.1, beams 3, max/min length 20 / 5, its `num_dec_layers`
    unused by model_captioning.py) and the domain pre-training's stored config (no label_smoothing: its model
    has none) set `label_smoothing` and the generation config."""
    arch = tiny_arch()
    sd = _official(arch, seed=47)
    extra = ("num_dec_layers: 6\nlabel_smoothing: 0.2\nmax_length: 16\nmin_length: 6\nnum_beams: 2\n"
             "prompt: 'a picture of '\n")
    yaml_path = official_task_files(tmp_path, arch, name="Captioning.yaml", extra=extra)
    model, result = convert_checkpoint({"model": sd}, config=yaml_path, log=None)
    assert result.task == "captioning" and model.config.label_smoothing == 0.2
    assert model.config.num_decoder_layers is None and "num_decoder_layers" not in result.inference.top
    config = model.generation_config
    assert (config.num_beams, config.max_length, config.min_length) == (2, 16, 6)
    assert not [n for n in result.notes if "prompt is" in n]
    domain = {"image_res": arch.image_res, "max_tokens": 40, "pad_token_id": 0}
    model, result = convert_checkpoint({"model": sd, "config": domain}, log=None)
    assert model.config.label_smoothing == 0.0
    assert "domain pre-training" in result.inference.provenance["top.label_smoothing"]
    config = model.generation_config
    assert (config.num_beams, config.max_length, config.min_length) == (3, 20, 5)  # the head's official defaults
    model, _ = convert_checkpoint({"model": sd}, log=None)  # no config at all: the model's default (0.1)
    assert model.config.label_smoothing is None
    _, result = convert_checkpoint({"model": sd, "config": dict(domain, label_smoothing=0.1, prompt="")}, log=None)
    assert result.config.label_smoothing == 0.1 and any("prompt is ''" in n for n in result.notes)


def test_cli_captioning_end_to_end_and_round_trip(tmp_path, tiny_vocab, capsys):
    """`xvlm-convert` (task detected) on a fine-tuned checkpoint with the official YAML and a vocab: the folder
    reloads with identical outputs and generations, stores the tied LM-head weight once, carries [CLS] / [SEP] as
    bos / eos, the official decoding settings and a standard processor; the reloaded model matches the official
    computation, and the official caption text (decode, cut `len(prompt)` characters) is the caption's tokens."""
    arch = tiny_arch(vocab=len(tiny_vocab))
    sd = _official(arch, seed=48, sep_bias=1.0)
    checkpoint = tmp_path / "checkpoint_04.pth"
    torch.save({"model": sd, "config": {"image_res": arch.image_res, "label_smoothing": 0.1}}, checkpoint)
    extra = "label_smoothing: 0.1\nnum_beams: 3\nmax_length: 14\nmin_length: 5\nprompt: 'a picture of '\n"
    yaml_path = official_task_files(tmp_path, arch, name="Captioning.yaml", extra=extra)
    vocab_dir = tmp_path / "bert"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.txt").write_text("\n".join(sorted(tiny_vocab, key=tiny_vocab.get)) + "\n")
    out = tmp_path / "converted"
    from modeling_xvlm.conversion.__main__ import main

    assert main(["--checkpoint", str(checkpoint), "--output", str(out), "--config", yaml_path,
                 "--tokenizer", str(vocab_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Detected task: captioning" in printed and "Verified:" in printed
    assert "caption decoding (generation_config): num_beams 3, max_length 14, min_length 5" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["XVLMForConditionalGeneration"] and config["label_smoothing"] == 0.1
    assert config["text_config"]["bos_token_id"] == CLS and config["text_config"]["eos_token_id"] == SEP
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["max_length"], generation["min_length"]) == (3, 14, 5)
    card = (out / "README.md").read_text()
    assert "XVLMForConditionalGeneration" in card and "caption decoder" in card
    with safe_open(out / "model.safetensors", "pt") as handle:
        names = list(handle.keys())
    assert TIED not in names and len([n for n in names if "word_embeddings" in n]) == 1
    assert {n.split(".")[0] for n in names} == {"vision_model", "text_decoder"}
    from modeling_xvlm.processing import XVLMProcessor

    processor = XVLMProcessor.from_pretrained(out)
    assert processor.tokenizer.cls_token_id == CLS and processor.tokenizer.sep_token_id == SEP
    assert processor.image_processor.size["height"] == arch.image_res
    reloaded = head_class("captioning").from_pretrained(out).eval()
    decoder = reloaded.text_decoder
    assert decoder.lm_head.decoder.weight is decoder.text_model.embeddings.word_embeddings.weight
    converted, _ = _convert_in_memory(sd, arch)
    images = _images(arch, seed=6)
    ids, atts = _captions()
    kwargs = {"pixel_values": images, "input_ids": ids, "attention_mask": atts, "labels": caption_labels(ids, atts, 4)}
    prompt = processor.tokenizer(CAPTION_PROMPT)["input_ids"]
    assert prompt[:-1] == PROMPT and prompt[-1] == SEP  # the official prompt ids, [SEP] dropped by generate
    prompts = torch.tensor([prompt] * 3)
    with torch.no_grad():
        a, b = converted(**kwargs), reloaded(**kwargs)
        generated_a = converted.generate(images, prompts, max_length=14)
        generated_b = reloaded.generate(images, prompts)  # the saved decoding settings
        r = cref.caption_forward(sd, images, ids, atts, _spec(arch), arch.image_res, arch.window, 4, 0.1)
        states = cref.caption_image_states(sd, images, arch.image_res, arch.window)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert torch.equal(generated_a, generated_b)
    assert _max_diff(r["logits"], b.logits) <= TOL and abs(r["loss"].item() - b.loss.item()) <= TOL
    reference = cref.beam_search_4125(cref.OfficialCaptionDecoder(sd, _spec(arch)), prompts[:, :-1], states,
                                      num_beams=3, max_length=14, min_length=5, eos=SEP, pad=PAD)
    for row, image in zip(generated_b, reference):
        assert _strip_pad(row, len(image[0][0])) == image[0][0]
    captions = cref.official_captions(processor.tokenizer, generated_b, CAPTION_PROMPT)
    for caption, row in zip(captions, generated_b.tolist()):
        words = [t for t in row[len(PROMPT):] if t not in (SEP, PAD)]
        assert caption == processor.tokenizer.decode(words) and caption == caption.strip()
