"""Official VQA checkpoints (`model_vqa.py`): key accounting (789 keys, 37 buffers, 293,483,442 parameters at base
size with the tied decoder embedding counted once), the pre-training -> VQA path of the official loader, and fp32
parity of the converted `XVLMForQuestionAnswering` with the independent re-implementation of the official
computation (`official_reference.py`: question states, decoder logits, the training loss and `rank_answer`) on
official-format state dicts (`official_format.py`)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(__file__))

import official_reference as ref  # noqa: E402
from official_format import (  # noqa: E402
    base_arch,
    official_state_dict,
    official_task_files,
    official_vqa_loader,
    sequence_diffs,
    tiny_arch,
    vqa_decoder_layers,
)

from modeling_xvlm import XVLMForQuestionAnswering  # noqa: E402
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

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
CLS, SEP, PAD = 2, 3, 0
TEXT = "xvlm.text_model."
DECODER = "text_decoder.text_model."
HEAD = "text_decoder.lm_head."


def _convert_in_memory(sd, arch, image_size=None):
    config, inference = build_config(
        sd, OfficialConfig(text={"num_attention_heads": arch.text_heads}), image_size=image_size, task="vqa"
    )
    window = config.vision_config.window_size
    same_geometry = window == inference.source_window and config.image_size == inference.source_image
    result = convert_state_dict(sd, "vqa", target_window=None if same_geometry else window, config=config)
    result.config = config
    model = head_class("vqa")(config)
    load_into_model(result, model)
    return model.eval(), result


def _specs(arch):
    """(encoder spec, decoder spec): the decoder cross-attends from its first layer on."""
    return (
        ref.TextSpec(arch.text_heads, arch.fusion, arch.layers),
        ref.TextSpec(arch.text_heads, 0, vqa_decoder_layers(arch)),
    )


def _questions(arch, n=3, length=7, seed=1):
    """Images and questions `[CLS] words` (no [SEP], official) with padding in question 1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, arch.image_res, arch.image_res, generator=g)
    ids = torch.randint(5, arch.vocab, (n, length), generator=g)
    ids[:, 0] = CLS
    atts = torch.ones(n, length, dtype=torch.long)
    atts[1, 4:] = 0
    ids[atts == 0] = PAD
    return images, ids, atts


def _answers(rows):
    """`[CLS] answer [SEP]` padded with [PAD] (official `tokenizer(answer + '[SEP]', padding='longest')`)."""
    width = max(len(r) for r in rows) + 2
    ids = torch.tensor([[CLS, *r, SEP] + [PAD] * (width - len(r) - 2) for r in rows])
    return ids, (ids != PAD).long()


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _text_keys(keys, prefix):
    return [k for k in keys if k.startswith(prefix)]


# ----------------------------------------------------------------------------------------------------------------
# Key accounting
# ----------------------------------------------------------------------------------------------------------------


def _check_key_rules(sd, arch):
    """The official key counts by rule: encoder 6 embedding keys + 16 per layer + 10 per fusion layer; decoder the
    same with every layer cross-attending, plus 7 LM-head keys (decoder weight and bias being aliases)."""
    layers, fusion, dec = arch.layers, arch.fusion, vqa_decoder_layers(arch)
    assert len(_text_keys(sd, "text_encoder.")) == 6 + 16 * layers + 10 * (layers - fusion)
    assert len(_text_keys(sd, "text_decoder.bert.")) == 6 + 26 * dec
    assert len(_text_keys(sd, "text_decoder.cls.")) == 7
    assert tuple(sd["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"].shape) == (arch.hidden,) * 2
    assert tuple(sd[f"text_encoder.encoder.layer.{fusion}.crossattention.self.value.weight"].shape) == (
        arch.hidden,
        arch.vision_width,
    )


def _check_model_covers(result, model):
    """Every mapped official key lands on a model weight, and every model weight comes from an official key."""
    state = model.state_dict()
    targets = {t for ts in result.mapping.values() for t in ts}
    assert targets <= set(state)
    tied = {"text_decoder.lm_head.decoder.weight"}
    assert set(state) - targets == tied


def test_base_key_accounting_on_meta():
    sd = official_state_dict(base_arch(384), "vqa", device="meta")
    assert len(sd) == 789
    buffers = [k for k in sd if k.endswith(("relative_position_index", "attn_mask", "position_ids"))]
    assert len(buffers) == 37
    assert detect_task(sd) == "vqa"
    _check_key_rules(sd, base_arch(384))
    config, inference = build_config(sd, image_size=384, task="vqa")
    assert config.num_decoder_layers == 6 and inference.top["num_decoder_layers"] == 6
    assert "inferred" in inference.provenance["top.num_decoder_layers"]
    assert config.text_config.num_hidden_layers == 12 and config.text_config.fusion_layer == 6
    result = convert_state_dict(sd, "vqa", target_window=12, config=config)
    assert set(result.mapping) | set(result.dropped) == set(sd)
    assert not set(result.mapping) & set(result.dropped) and not result.new
    assert len(result.dropped) == 39  # 37 buffers + the LM head's tied decoder weight and bias
    assert {k for k, r in result.dropped.items() if "tied" in r or "alias" in r} == {
        "text_decoder.cls.predictions.decoder.weight",
        "text_decoder.cls.predictions.decoder.bias",
    }
    assert len(result.state_dict) == len(result.mapping) + 2 * 48  # Swin qkv in three parts
    with torch.device("meta"):
        model = head_class("vqa")(config)
    load_into_model(result, model)
    _check_model_covers(result, model)
    assert sum(p.numel() for p in model.parameters()) == 293_483_442  # tied decoder embedding counted once


def test_base_pretraining_checkpoint_into_vqa_on_meta():
    """The official start of VQA fine-tuning: a 224 pre-training checkpoint into a 384 VQA model; the decoder's
    cross-attention key/value (1024 -> 768 wide) are the only new weights."""
    sd = official_state_dict(base_arch(224), "pretrain", device="meta")
    config, inference = build_config(sd, image_size=384, task="vqa")
    assert config.num_decoder_layers == 6 and "fusion layers" in inference.provenance["top.num_decoder_layers"]
    result = convert_state_dict(sd, "vqa", target_window=12, config=config)
    assert len(result.interpolated) == 24
    assert sorted(result.new) == sorted(
        f"{DECODER}encoder.layer.{i}.crossattention.self.{n}." for i in range(6) for n in ("key", "value")
    )
    summary = result.summary()
    assert summary.count("new: text_decoder.text_model.encoder.layer.") == 12 and "newly initialised" in summary
    dropped_heads = {k.split(".")[0] for k, reason in result.dropped.items() if "not part of" in reason}
    assert dropped_heads == {"itm_head", "bbox_head", "vision_proj", "text_proj", "temp"}
    # fusion layer 6 + i -> encoder layer 6 + i and decoder layer i; the key/value to the encoder only
    assert result.mapping["text_encoder.bert.encoder.layer.8.crossattention.self.query.weight"] == [
        f"{TEXT}encoder.layer.8.crossattention.self.query.weight",
        f"{DECODER}encoder.layer.2.crossattention.self.query.weight",
    ]
    assert result.mapping["text_encoder.bert.encoder.layer.8.crossattention.self.key.weight"] == [
        f"{TEXT}encoder.layer.8.crossattention.self.key.weight"
    ]
    assert result.mapping["text_encoder.bert.encoder.layer.5.output.dense.weight"] == [
        f"{TEXT}encoder.layer.5.output.dense.weight"
    ]
    assert result.mapping["text_encoder.bert.embeddings.word_embeddings.weight"] == [
        f"{TEXT}embeddings.word_embeddings.weight",
        f"{DECODER}embeddings.word_embeddings.weight",
    ]
    assert result.mapping["text_encoder.cls.predictions.bias"] == [HEAD + "decoder.bias"]
    assert NEW_HEADS[("vqa", "pretrain")] == {"decoder"} and SOURCE_HEADS[("vqa", "pretrain")] == {"mlm"}
    with torch.device("meta"):
        model = head_class("vqa")(config)
    load_into_model(result, model)
    assert sum(p.numel() for p in model.parameters()) == 293_483_442


def test_tiny_every_tensor_lands_where_it_should():
    arch = tiny_arch()
    sd = official_state_dict(arch, "vqa", seed=30)
    _check_key_rules(sd, arch)
    model, result = _convert_in_memory(sd, arch)
    assert model.config.num_decoder_layers == vqa_decoder_layers(arch) == 2
    _check_model_covers(result, model)
    state = model.state_dict()
    enc, dec, lm = "text_encoder.", "text_decoder.bert.", "text_decoder.cls.predictions."
    expected = {
        f"{TEXT}encoder.layer.3.crossattention.self.key.weight": f"{enc}encoder.layer.3.crossattention.self.key.weight",
        f"{TEXT}embeddings.position_embeddings.weight": f"{enc}embeddings.position_embeddings.weight",
        f"{DECODER}embeddings.word_embeddings.weight": f"{dec}embeddings.word_embeddings.weight",
        f"{DECODER}encoder.layer.1.crossattention.self.value.bias": f"{dec}encoder.layer.1.crossattention.self.value.bias",
        f"{DECODER}encoder.layer.0.output.LayerNorm.weight": f"{dec}encoder.layer.0.output.LayerNorm.weight",
        f"{HEAD}transform.dense.weight": f"{lm}transform.dense.weight",
        f"{HEAD}transform.LayerNorm.bias": f"{lm}transform.LayerNorm.bias",
        f"{HEAD}decoder.bias": f"{lm}bias",
        f"{HEAD}decoder.weight": f"{lm}decoder.weight",
    }
    for ours, official in expected.items():
        assert torch.equal(state[ours], sd[official]), ours
    decoder = model.text_decoder
    assert decoder.lm_head.decoder.weight is decoder.text_model.embeddings.word_embeddings.weight
    for source, targets in result.mapping.items():
        joined = torch.cat([state[t].reshape(-1) for t in targets]) if len(targets) > 1 else state[targets[0]].reshape(-1)
        assert torch.equal(joined, sd[source].reshape(-1)), source


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_missing_untied_and_wrong_task_are_errors():
    arch = tiny_arch()
    sd = official_state_dict(arch, "vqa")
    unknown = ("text_decoder.bert.encoder.layer.0.crossattention.extra.weight", "text_decoder.cls.seq_relationship.weight")
    for extra in unknown:
        with pytest.raises(ConversionError, match=extra.replace(".", r"\.")):
            convert_state_dict(dict(sd, **{extra: torch.zeros(1)}), "vqa")
    with pytest.raises(ConversionError, match=r"text_decoder\.cls\.predictions\.bias"):
        convert_state_dict({k: v for k, v in sd.items() if k != "text_decoder.cls.predictions.bias"}, "vqa")
    missing = {k: v for k, v in sd.items() if ".layer.1.output.dense." not in k or not k.startswith("text_decoder.")}
    config, _ = build_config(missing, task="vqa")
    result = convert_state_dict(missing, "vqa", config=config)
    with pytest.raises(ConversionError, match=r"text_decoder\.text_model\.encoder\.layer\.1\.output\.dense"):
        load_into_model(result, head_class("vqa")(config))
    untied = dict(sd)
    untied["text_decoder.cls.predictions.decoder.weight"] = untied["text_decoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ConversionError, match="tied"):
        convert_state_dict(untied, "vqa")
    with pytest.raises(ConversionError, match="--task vqa"):
        convert_state_dict(sd, "retrieval")
    with pytest.raises(ConversionError, match="VQA or pre-training"):
        convert_state_dict(official_state_dict(arch, "retrieval"), "vqa")
    with pytest.raises(ConversionError, match="VQA or pre-training"):
        convert_checkpoint({"model": official_state_dict(arch, "grounding")}, task="vqa", log=None)


def test_captioning_checkpoints_are_not_vqa_checkpoints():
    """A `text_decoder` without `text_encoder` is an official captioning checkpoint (tests/test_conversion_captioning.py
    converts it); the VQA conversion refuses it clearly."""
    arch = tiny_arch()
    captioning = official_state_dict(arch, "captioning")
    assert detect_task(captioning) == "captioning"
    for call in (
        lambda: convert_state_dict(captioning, "vqa"),
        lambda: convert_checkpoint({"model": captioning}, task="vqa", log=None),
        lambda: convert_checkpoint({"model": captioning}, task="retrieval", log=None),
    ):
        with pytest.raises(ConversionError, match="official captioning checkpoint .* --task captioning"):
            call()


def test_decoder_layer_count_must_agree_with_the_official_config(tmp_path):
    arch = tiny_arch()
    sd = official_state_dict(arch, "vqa")
    with pytest.raises(ConversionError, match="num_dec_layers = 3"):
        build_config(sd, OfficialConfig(top={"num_decoder_layers": 3}), task="vqa")
    pre = official_state_dict(arch, "pretrain")
    with pytest.raises(ConversionError, match="one decoder layer per fusion layer"):
        build_config(pre, OfficialConfig(top={"num_decoder_layers": 1}), task="vqa")
    yaml_path = official_task_files(tmp_path, arch, name="VQA.yaml", extra="num_dec_layers: 2\n")
    _, result = convert_checkpoint({"model": sd}, task="vqa", config=yaml_path, log=None)
    assert result.config.num_decoder_layers == 2


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official computation
# ----------------------------------------------------------------------------------------------------------------


def _training_batch(arch):
    images, ids, atts = _questions(arch)
    counts = [2, 1, 3]  # official `k`: answers per question
    answer_ids, answer_atts = _answers([[7], [9, 11, 5], [12, 13], [8], [20, 6, 7, 9], [10]])
    weights = torch.tensor([0.6, 0.4, 1.0, 0.5, 0.3, 0.2])
    return images, ids, atts, counts, answer_ids, answer_atts, weights


def test_vqa_parity_question_states_logits_and_loss():
    arch = tiny_arch()
    sd = official_state_dict(arch, "vqa", seed=31)
    model, _ = _convert_in_memory(sd, arch)
    spec, decoder_spec = _specs(arch)
    images, ids, atts, counts, answer_ids, answer_atts, weights = _training_batch(arch)
    diffs = {}
    with torch.no_grad():
        r = ref.vqa_forward(sd, images, ids, atts, answer_ids, answer_atts, counts, weights, spec, decoder_spec,
                            arch.image_res, arch.window)
        out = model(pixel_values=images, input_ids=ids, attention_mask=atts, labels=answer_ids,
                    answer_weights=weights, answers_per_question=torch.tensor(counts))
        diffs.update(sequence_diffs("question_states", r["question_states"], out.question_states, atts))
        diffs["logits"] = _max_diff(r["logits"], out.logits)
        diffs["answer_loss"] = _max_diff(r["answer_loss"], out.answer_loss)
        diffs["loss"] = _max_diff(r["loss"], out.loss)
        # the building blocks: encoder alone, decoder alone on the official question states
        question, _ = model.encode_questions(images, ids, atts)
        diffs.update(sequence_diffs("encode_questions", r["question_states"], question.last_hidden_state, atts))
        decoded = model.decode_answers(r["question_states"], atts, torch.tensor(counts), answer_ids, answer_atts)
        diffs["decode_answers"] = _max_diff(r["logits"], decoded.logits)
    assert out.logits.shape == (6, answer_ids.shape[1], arch.vocab)
    assert r["loss"].item() > 0 and out.answer_loss.shape == (6,)
    print(json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    assert all(v <= TOL for v in diffs.values()), diffs


def _candidates():
    """Ten candidates `[CLS] a [SEP]`; answers 0 / 1 and 4 / 7 share their first token."""
    return _answers([[7], [7, 9], [11], [12, 5], [13, 14, 15], [16], [17, 7], [13], [18, 19], [20]])


@pytest.mark.parametrize("official", [True, False])
def test_rank_answers_parity(official):
    arch = tiny_arch()
    sd = official_state_dict(arch, "vqa", seed=32)
    model, _ = _convert_in_memory(sd, arch)
    assert model.config.official_answer_scoring is True  # the converted default reproduces the official ranking
    _, decoder_spec = _specs(arch)
    images, ids, atts = _questions(arch, seed=4)
    candidates, candidate_atts = _candidates()
    k = 5
    with torch.no_grad():
        states = ref.vqa_question_states(sd, images, ids, atts, _specs(arch)[0], arch.image_res, arch.window)
        r = ref.vqa_rank_answer(sd, states, atts, candidates, candidate_atts, k, decoder_spec, official=official)
        ours = model.rank_answers(images, ids, atts, candidates, candidate_atts, k=k, official_answer_scoring=official)
        first = model.first_token_probabilities(states, atts, candidates)
    assert torch.equal(ours.candidate_indices, r["candidate_indices"])
    diffs = {
        "probabilities": _max_diff(ours.probabilities, r["probabilities"]),
        "scores": _max_diff(ours.scores, r["scores"]),
        "first_token": _max_diff(first, r["first_probabilities"]),
    }
    print(json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    assert all(v <= TOL for v in diffs.values()), diffs
    # answers sharing a first token tie in the first stage (in both)
    for a, b in ((0, 1), (4, 7)):
        assert torch.equal(r["first_probabilities"][:, a], r["first_probabilities"][:, b])
        assert torch.equal(first[:, a], first[:, b])
    # a candidate outside the first-stage top k never appears, let alone wins
    first_stage = r["first_probabilities"].topk(k, dim=1).indices
    for row, chosen in zip(first_stage, ours.candidate_indices):
        assert set(chosen.tolist()) == set(row.tolist())
    # the official score counts the first token twice: it differs from the corrected one by log p(first token)
    other = model.rank_answers(images, ids, atts, candidates, candidate_atts, k=k, official_answer_scoring=not official)
    assert not torch.allclose(other.scores.sort(dim=1).values, ours.scores.sort(dim=1).values)


# ----------------------------------------------------------------------------------------------------------------
# Pre-training -> VQA (the official loader)
# ----------------------------------------------------------------------------------------------------------------


def _official_name(key):
    """Our in-memory name of an official VQA key (text part)."""
    if key.startswith("text_encoder."):
        return TEXT + key[len("text_encoder.") :]
    if key.startswith("text_decoder.bert."):
        return DECODER + key[len("text_decoder.bert.") :]
    rest = key[len("text_decoder.cls.predictions.") :]
    return HEAD + ("decoder.bias" if rest == "bias" else rest)


def _new_keys(arch):
    return {
        f"{DECODER}encoder.layer.{i}.crossattention.self.{n}.{p}"
        for i in range(vqa_decoder_layers(arch))
        for n in ("key", "value")
        for p in ("weight", "bias")
    }


def test_pretraining_to_vqa_gives_the_official_copied_parameters(tmp_path):
    """Converting a pre-training checkpoint for VQA = the official VQA loader followed by
    `load_state_dict(strict=False)`: every text tensor the official model would load is the converted one, decoder
    layer i is fusion layer f + i, the decoder's cross-attention key/value are new; the forward then matches the
    official forward on that state. `XVLMForQuestionAnswering.from_pretraining` of the converted pre-training model
    gives the same weights."""
    arch = tiny_arch()
    sd = official_state_dict(arch, "pretrain", seed=33)
    yaml_path = official_task_files(tmp_path, arch)
    model, result = convert_checkpoint({"model": sd}, task="vqa", config=yaml_path, log=None)
    assert {prefix + p for prefix in result.new for p in ("weight", "bias")} == _new_keys(arch)
    official = official_vqa_loader(sd, arch.fusion, resized=arch.hidden != arch.vision_width)
    official_keys = {k for k in official_state_dict(arch, "vqa", device="meta") if k.startswith("text_")}
    loaded = {k: v for k, v in official.items() if k in official_keys}  # strict=False: the model's keys only
    not_loaded = {_official_name(k) for k in official_keys - set(loaded) if not k.endswith("position_ids")}
    assert not_loaded == _new_keys(arch)
    state = model.state_dict()
    compared = 0
    for key, tensor in loaded.items():
        if key.endswith("position_ids"):
            continue  # a non-persistent arange buffer in the converted model
        assert torch.equal(state[_official_name(key)], tensor), key
        compared += 1
    assert compared == len(official_keys) - len(not_loaded) - 2 > 0  # two position_ids buffers
    # decoder layer i holds pre-trained fusion layer f + i (every copied tensor); key/value stay new
    for name, tensor in state.items():
        if name.startswith(f"{DECODER}encoder.layer."):
            layer, tail = name[len(f"{DECODER}encoder.layer."):].split(".", 1)
            source = sd[f"text_encoder.bert.encoder.layer.{arch.fusion + int(layer)}.{tail}"]
            if name in _new_keys(arch):  # weights [24, 24] (question states) vs [24, 32] (image); fresh biases
                assert tensor.shape != source.shape or not torch.equal(tensor, source), name
            else:
                assert torch.equal(tensor, source), name
    # the same through the model API, from the converted pre-training model
    pretrained, _ = convert_checkpoint({"model": sd}, task="pretrain", config=yaml_path, log=None)
    from_api = XVLMForQuestionAnswering.from_pretraining(pretrained)
    assert set(from_api.newly_initialized_keys) == _new_keys(arch)
    api_state = from_api.state_dict()
    assert set(api_state) == set(state)
    for name, tensor in state.items():
        if name not in _new_keys(arch):
            assert torch.equal(api_state[name], tensor), name
    # the official forward on the official loader's state (with the converted model's fresh key/value)
    full = dict(sd, **loaded)
    for name in _new_keys(arch):
        layer, tail = name[len(f"{DECODER}encoder.layer."):].split(".", 1)
        full[f"text_decoder.bert.encoder.layer.{layer}.{tail}"] = state[name]
    full["text_decoder.cls.predictions.decoder.weight"] = full["text_decoder.bert.embeddings.word_embeddings.weight"]
    spec, decoder_spec = _specs(arch)
    images, ids, atts, counts, answer_ids, answer_atts, weights = _training_batch(arch)
    with torch.no_grad():
        full_text = {k: v for k, v in full.items() if not k.startswith("text_encoder.bert.")}
        r = ref.vqa_forward(full_text, images, ids, atts, answer_ids, answer_atts, counts, weights, spec, decoder_spec,
                            arch.image_res, arch.window)
        out = model.eval()(pixel_values=images, input_ids=ids, attention_mask=atts, labels=answer_ids,
                           answer_weights=weights, answers_per_question=torch.tensor(counts))
    assert _max_diff(r["logits"], out.logits) <= TOL and _max_diff(r["loss"], out.loss) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# Command line, folder, round trip
# ----------------------------------------------------------------------------------------------------------------


def test_cli_vqa_end_to_end_and_round_trip(tmp_path, tiny_vocab, capsys):
    """`xvlm-convert` (task detected) with the official YAML and a vocab: the folder reloads with identical
    outputs, stores the tied decoder weight once, carries [CLS] / [SEP] as bos / eos and the official question
    processor; the reloaded model matches the official computation."""
    arch = tiny_arch(vocab=len(tiny_vocab))
    sd = official_state_dict(arch, "vqa", seed=34)
    checkpoint = tmp_path / "checkpoint_best.pth"
    torch.save({"model": sd, "config": {"image_res": arch.image_res, "num_dec_layers": 2}}, checkpoint)
    yaml_path = official_task_files(tmp_path, arch, name="VQA.yaml", extra="num_dec_layers: 2\nk_test: 128\n")
    vocab_dir = tmp_path / "bert"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.txt").write_text("\n".join(sorted(tiny_vocab, key=tiny_vocab.get)) + "\n")
    out = tmp_path / "converted"
    from modeling_xvlm.conversion.__main__ import main

    assert main(["--checkpoint", str(checkpoint), "--output", str(out), "--config", yaml_path,
                 "--tokenizer", str(vocab_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Detected task: vqa" in printed and "Verified:" in printed
    assert "num_decoder_layers = 2  [inferred" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["XVLMForQuestionAnswering"] and config["num_decoder_layers"] == 2
    assert config["text_config"]["bos_token_id"] == CLS and config["text_config"]["eos_token_id"] == SEP
    assert "XVLMForQuestionAnswering" in (out / "README.md").read_text()
    with safe_open(out / "model.safetensors", "pt") as handle:
        names = list(handle.keys())
    assert not [n for n in names if "lm_head.decoder.weight" in n]
    assert len([n for n in names if n.startswith("text_decoder.") and "word_embeddings" in n]) == 1
    from modeling_xvlm.processing import XVLMProcessor

    processor = XVLMProcessor.from_pretrained(out)
    assert processor.text_preprocessing == "question" and processor.max_words == 50
    reloaded = head_class("vqa").from_pretrained(out).eval()
    decoder = reloaded.text_decoder
    assert decoder.lm_head.decoder.weight is decoder.text_model.embeddings.word_embeddings.weight
    assert decoder.config.bos_token_id == CLS and decoder.config.eos_token_id == SEP
    converted, _ = _convert_in_memory(sd, arch)
    spec, decoder_spec = _specs(arch)
    images, ids, atts, counts, answer_ids, answer_atts, weights = _training_batch(arch)
    candidates, candidate_atts = _candidates()
    kwargs = {"pixel_values": images, "input_ids": ids, "attention_mask": atts, "labels": answer_ids,
              "answer_weights": weights, "answers_per_question": torch.tensor(counts)}
    with torch.no_grad():
        a, b = converted(**kwargs), reloaded(**kwargs)
        ranked_a = converted.rank_answers(images, ids, atts, candidates, candidate_atts, k=4)
        ranked_b = reloaded.rank_answers(images, ids, atts, candidates, candidate_atts, k=4)
        r = ref.vqa_forward(sd, images, ids, atts, answer_ids, answer_atts, counts, weights, spec, decoder_spec,
                            arch.image_res, arch.window)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert torch.equal(ranked_a.candidate_indices, ranked_b.candidate_indices)
    assert torch.equal(ranked_a.probabilities, ranked_b.probabilities)
    assert _max_diff(r["logits"], b.logits) <= TOL and _max_diff(r["loss"], b.loss) <= TOL
    # the processor's questions are the official `[CLS] words` (no [SEP]) after pre_question
    encoded = processor(text=["What is the man riding?"])["input_ids"][0].tolist()
    assert encoded[0] == CLS and SEP not in encoded


def test_cli_pretraining_checkpoint_to_vqa_lists_the_new_keys(tmp_path, capsys):
    arch = tiny_arch()
    sd = official_state_dict(arch, "pretrain", seed=35)
    checkpoint = tmp_path / "model_state_step_199999.th"
    torch.save({"model": sd}, checkpoint)
    yaml_path = official_task_files(tmp_path, arch, name="VQA.yaml", extra="num_dec_layers: 2\n")
    from modeling_xvlm.conversion.__main__ import main

    assert main(["--checkpoint", str(checkpoint), "--task", "vqa", "--output", str(tmp_path / "vqa-init"),
                 "--config", yaml_path, "--no-tokenizer"]) == 0
    printed = capsys.readouterr().out
    for name in sorted(_new_keys(arch)):
        prefix = name.rsplit(".", 1)[0] + ".*"
        assert f"new: {prefix}" in printed, prefix
    assert "converted a pretrain checkpoint for the vqa task" in printed
    assert "Newly initialised: `text_decoder.text_model.encoder.layer.0.crossattention.self.key.*`" in (
        tmp_path / "vqa-init" / "README.md"
    ).read_text()
