"""Official NLVR2 checkpoints (`model_nlvr.py`) and their text-assignment pre-training (`model_nlvr_pretrain.py`):
key accounting (782 / 780 keys at base size, tied cross-attention key/value aliases), the pre-training -> NLVR2
path of the official loader, and fp32 parity of the converted heads with the independent re-implementation of the
official forward (`official_reference.py`) on official-format state dicts (`official_format.py`)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import official_reference as ref  # noqa: E402
from official_format import (  # noqa: E402
    base_arch,
    nlvr2_layers,
    official_nlvr2_loader,
    official_state_dict,
    official_task_files,
    shared_cross_attention_keys,
    tiny_arch,
)

from modeling_xvlm.conversion import (  # noqa: E402
    ConversionError,
    build_config,
    convert_checkpoint,
    convert_state_dict,
    detect_task,
    head_class,
    load_into_model,
)
from modeling_xvlm.conversion.official_config import OfficialConfig  # noqa: E402

TOL = 1e-5
TEXT = "xvlm.text_model."


def _convert_in_memory(sd, task, arch, image_size=None):
    config, inference = build_config(
        sd, OfficialConfig(text={"num_attention_heads": arch.text_heads}), image_size=image_size, task=task
    )
    window = config.vision_config.window_size
    same_geometry = window == inference.source_window and config.image_size == inference.source_image
    result = convert_state_dict(sd, task, target_window=None if same_geometry else window)
    result.config = config
    model = head_class(task)(config)
    load_into_model(result, model)
    return model.eval(), result


def _spec(arch):
    return ref.TextSpec(arch.text_heads, arch.fusion, nlvr2_layers(arch))


def _inputs(arch, n=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(n, 3, arch.image_res, arch.image_res, generator=g)
    right = torch.randn(n, 3, arch.image_res, arch.image_res, generator=g)
    ids = torch.randint(5, arch.vocab, (n, length), generator=g)
    ids[:, 0] = 2
    atts = torch.ones(n, length, dtype=torch.long)
    atts[1, 4:] = 0
    ids[atts == 0] = 0
    return left, right, ids, atts


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Key accounting at base size (meta tensors)
# ----------------------------------------------------------------------------------------------------------------

BASE_PARAMS = {("nlvr2", 384): 263_123_834, ("nlvr2-pretrain", 224): 262_065_851}


@pytest.mark.parametrize("task,image_res", [("nlvr2", 384), ("nlvr2-pretrain", 224)])
def test_base_key_accounting_on_meta(task, image_res):
    sd = official_state_dict(base_arch(image_res), task, device="meta")
    assert len(sd) == {"nlvr2": 782, "nlvr2-pretrain": 780}[task]
    assert detect_task(sd) == task
    config, inference = build_config(sd, image_size=image_res, task=task)
    assert inference.text["num_hidden_layers"] == 18 and inference.text["fusion_layer"] == 6
    assert inference.text["tie_cross_attention_pairs"] is True
    assert config.text_config.num_hidden_layers == 18 and config.text_config.tie_cross_attention_pairs
    result = convert_state_dict(sd, task, target_window=config.vision_config.window_size)
    assert set(result.mapping) | set(result.dropped) == set(sd)
    assert not set(result.mapping) & set(result.dropped)
    aliases = [k for k, reason in result.dropped.items() if "share_cross_attention" in reason]
    assert sorted(aliases) == sorted(odd for _, odd in shared_cross_attention_keys(base_arch()))
    assert len(aliases) == 24
    buffers = [k for k in result.dropped if k.endswith(("relative_position_index", "attn_mask", "position_ids"))]
    assert len(buffers) == 36 and len(result.dropped) == 60 and not result.new
    assert len(result.state_dict) == len(result.mapping) + 2 * 48
    with torch.device("meta"):
        model = head_class(task)(config)
    load_into_model(result, model)
    assert sum(p.numel() for p in model.parameters()) == BASE_PARAMS[(task, image_res)]


@pytest.mark.parametrize("task", ["nlvr2", "nlvr2-pretrain"])
def test_base_pretraining_checkpoint_into_nlvr2_on_meta(task):
    """The official start of NLVR2 fine-tuning / TA pre-training: a 224 pre-training checkpoint, fusion layers
    duplicated, the new head reported, the heads the model lacks dropped with a reason."""
    sd = official_state_dict(base_arch(224), "pretrain", device="meta")
    config, _ = build_config(sd, image_size=384, task=task)
    assert config.text_config.num_hidden_layers == 18 and config.text_config.tie_cross_attention_pairs
    result = convert_state_dict(sd, task, target_window=12)
    assert len(result.interpolated) == 24
    head = {"nlvr2": "cls_head.", "nlvr2-pretrain": "ta_head."}[task]
    assert list(result.new) == [head] and "newly initialised" in result.summary()
    dropped_heads = {k.split(".")[0] for k, reason in result.dropped.items() if "not part of" in reason}
    expected = {"text_encoder", "itm_head", "bbox_head", "text_proj", "temp"}
    assert dropped_heads == (expected | {"vision_proj"} if task == "nlvr2" else expected)
    # fusion layer 6 + j -> 6 + 2j and 7 + 2j; its tied key/value once
    targets = result.mapping["text_encoder.bert.encoder.layer.8.crossattention.self.query.weight"]
    assert targets == [f"{TEXT}encoder.layer.10.crossattention.self.query.weight",
                       f"{TEXT}encoder.layer.11.crossattention.self.query.weight"]
    assert result.mapping["text_encoder.bert.encoder.layer.8.crossattention.self.key.bias"] == [
        f"{TEXT}encoder.layer.10.crossattention.self.key.bias"
    ]
    assert result.mapping["text_encoder.bert.encoder.layer.5.output.dense.weight"] == [
        f"{TEXT}encoder.layer.5.output.dense.weight"
    ]
    with torch.device("meta"):
        model = head_class(task)(config)
    load_into_model(result, model)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_alias_that_differs_from_its_partner_is_an_error_naming_it():
    arch = tiny_arch()
    sd = official_state_dict(arch, "nlvr2")
    even, odd = shared_cross_attention_keys(arch)[5]
    sd[odd] = sd[odd] + 1e-3
    with pytest.raises(ConversionError, match="tied partner") as info:
        convert_state_dict(sd, "nlvr2")
    assert odd in str(info.value) and even in str(info.value)


def test_unknown_missing_and_wrong_task_are_errors():
    arch = tiny_arch()
    sd = official_state_dict(arch, "nlvr2")
    with pytest.raises(ConversionError, match=r"ta_head\.extra"):
        convert_state_dict(dict(sd, **{"ta_head.extra": torch.zeros(1)}), "nlvr2")
    with pytest.raises(ConversionError, match=r"text_decoder\.bert\.foo"):
        convert_state_dict(dict(sd, **{"text_decoder.bert.foo": torch.zeros(1)}), "nlvr2")
    with pytest.raises(ConversionError, match="--task nlvr2"):
        convert_state_dict(sd, "retrieval")
    with pytest.raises(ConversionError, match="vision_proj"):
        convert_state_dict(sd, "nlvr2-pretrain")  # an NLVR2 checkpoint has no TA image projection
    with pytest.raises(ConversionError):
        convert_state_dict({k: v for k, v in sd.items() if not k.startswith("cls_head.")}, "nlvr2")
    ta = official_state_dict(arch, "nlvr2-pretrain")
    with pytest.raises(ConversionError, match=r"ta_head\.bias"):
        convert_state_dict({k: v for k, v in ta.items() if k != "ta_head.bias"}, "nlvr2-pretrain")
    missing_layer = {k: v for k, v in sd.items() if ".layer.4.output.dense." not in k}
    config, _ = build_config(missing_layer, task="nlvr2")
    result = convert_state_dict(missing_layer, "nlvr2")
    with pytest.raises(ConversionError, match=r"layer\.4\.output\.dense"):
        load_into_model(result, head_class("nlvr2")(config))
    with pytest.raises(ConversionError, match="pre-training"):
        convert_state_dict(official_state_dict(arch, "retrieval"), "nlvr2")


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official forward
# ----------------------------------------------------------------------------------------------------------------


def test_nlvr2_parity_and_image_swap():
    arch = tiny_arch()
    sd = official_state_dict(arch, "nlvr2", seed=21)
    model, result = _convert_in_memory(sd, "nlvr2", arch)
    assert model.config.text_config.num_hidden_layers == 6 and model.config.id2label == {0: "False", 1: "True"}
    # the tied pair is one tensor in the converted model, equal to the official one
    layer = model.xvlm.text_model.encoder.layer
    assert layer[2].crossattention.self.key.weight is layer[3].crossattention.self.key.weight
    torch.testing.assert_close(layer[3].crossattention.self.value.bias,
                               sd["text_encoder.encoder.layer.3.crossattention.self.value.bias"], rtol=0, atol=0)
    spec = _spec(arch)
    left, right, ids, atts = _inputs(arch)
    targets = torch.tensor([1, 0, 1])
    diffs = {}
    with torch.no_grad():
        r = ref.nlvr2_forward(sd, left, right, ids, atts, spec, arch.image_res, arch.window, targets)
        out = model(pixel_values=torch.stack([left, right], dim=1), input_ids=ids, attention_mask=atts, labels=targets)
        h_left, h_right = out.vision_model_output.last_hidden_state.chunk(2)
        diffs["image0"] = _max_diff(r["image0"], h_left)
        diffs["image1"] = _max_diff(r["image1"], h_right)
        diffs["fused_cls"] = _max_diff(r["cls"], out.text_model_output.last_hidden_state[:, 0])
        diffs["logits"] = _max_diff(r["logits"], out.logits)
        diffs["loss"] = _max_diff(r["loss"], out.loss)
        assert torch.equal(r["prediction"], out.logits.argmax(-1))
        # swapping the pair: the fusion layers read the other image first
        r_swap = ref.nlvr2_forward(sd, right, left, ids, atts, spec, arch.image_res, arch.window)
        swapped = model(pixel_values=torch.stack([right, left], dim=1), input_ids=ids, attention_mask=atts).logits
        diffs["logits_swapped"] = _max_diff(r_swap["logits"], swapped)
        diffs["swap_change"] = abs(_max_diff(r_swap["logits"], r["logits"]) - _max_diff(swapped, out.logits))
    assert _max_diff(swapped, out.logits) > 1e-3  # the order of the images matters
    print(json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    assert all(v <= TOL for v in diffs.values()), diffs


def test_text_assignment_parity_fixed_and_sampled_pairs():
    arch = tiny_arch()
    sd = official_state_dict(arch, "nlvr2-pretrain", seed=22)
    model, _ = _convert_in_memory(sd, "nlvr2-pretrain", arch)
    spec = _spec(arch)
    images, _, ids, atts = _inputs(arch, n=5, seed=3)
    ids = torch.cat([ids, ids[:2]])[:5]
    atts = torch.cat([atts, atts[:2]])[:5]
    diffs = {}
    left, right, labels = [1, 0, 4, 2, 3], [0, 3, 1, 4, 2], [0, 1, 2, 0, 2]
    with torch.no_grad():
        r = ref.ta_forward(sd, images, ids, atts, spec, arch.image_res, arch.window, (left, right, labels))
        out = model(pixel_values=images, input_ids=ids, attention_mask=atts,
                    pair_index=torch.tensor([left, right]).t(), labels=torch.tensor(labels))
        diffs["fixed.logits"] = _max_diff(r["logits"], out.logits)
        diffs["fixed.loss"] = _max_diff(r["loss"], out.loss)
        image_embeds = model.xvlm.encode_image(images).last_hidden_state
        r_embeds = ref.image_sequence(ref.swin_patch_tokens(sd, images, arch.image_res, arch.window))
        diffs["features"] = _max_diff(ref.ta_image_features(sd, r_embeds),
                                      torch.nn.functional.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1))
        seen = set()
        for seed in range(4):
            torch.manual_seed(seed)
            r = ref.ta_forward(sd, images, ids, atts, spec, arch.image_res, arch.window)
            torch.manual_seed(seed)
            out = model(pixel_values=images, input_ids=ids, attention_mask=atts)
            assert out.pair_index.tolist() == [list(p) for p in zip(r["left"], r["right"])], seed
            assert out.labels.tolist() == r["labels"].tolist(), seed
            seen |= set(r["labels"].tolist())
            diffs[f"sampled{seed}.logits"] = _max_diff(r["logits"], out.logits)
            diffs[f"sampled{seed}.loss"] = _max_diff(r["loss"], out.loss)
    assert seen == {0, 1, 2}  # the seeds exercise every branch of the sampling
    print(json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    assert all(v <= TOL for v in diffs.values()), diffs


@pytest.mark.parametrize("task", ["nlvr2", "nlvr2-pretrain"])
def test_pretraining_to_nlvr2_gives_the_official_copied_layers(task):
    """Converting a pre-training checkpoint for NLVR2 / TA = the official loader (`load_nlvr_pretrain=False`)
    followed by `load_state_dict(strict=False)`: every tensor the official model would load is the converted one,
    and the forward matches the official forward on that state (with the converted model's fresh head)."""
    arch = tiny_arch()
    sd = official_state_dict(arch, "pretrain", seed=23)
    model, result = _convert_in_memory(sd, task, arch)
    head = {"nlvr2": "cls_head", "nlvr2-pretrain": "ta_head"}[task]
    assert list(result.new) == [head + "."]
    official = official_nlvr2_loader(sd, arch.fusion)
    official_keys = set(official_state_dict(arch, task, device="meta"))
    loaded = {k: v for k, v in official.items() if k in official_keys}  # strict=False: the model's keys only
    assert {k for k in official_keys - set(loaded) if "position_index" not in k and "attn_mask" not in k} == {
        k for k in official_keys if k.startswith(head + ".")
    }
    state = model.state_dict()
    compared = 0
    for key, tensor in loaded.items():
        if key.endswith("position_ids"):
            continue  # a non-persistent arange buffer in the converted model
        if key.startswith("text_encoder."):
            mine = state[TEXT + key[len("text_encoder."):]]
        elif key == "vision_proj.weight" or key == "vision_proj.bias":
            mine = state[key]
        else:
            continue
        assert torch.equal(mine, tensor), key
        compared += 1
    assert compared == sum(1 for k in loaded if k.startswith(("text_encoder.", "vision_proj."))) - 1 > 0
    # every NLVR2 layer f + 2j and f + 2j + 1 holds pre-trained fusion layer f + j
    for j in range(arch.layers - arch.fusion):
        source = sd[f"text_encoder.bert.encoder.layer.{arch.fusion + j}.crossattention.self.query.weight"]
        for target in (arch.fusion + 2 * j, arch.fusion + 2 * j + 1):
            assert torch.equal(state[f"{TEXT}encoder.layer.{target}.crossattention.self.query.weight"], source)
    official_full = dict(loaded, **{k: v for k, v in state.items() if k.startswith(head + ".")})
    spec = _spec(arch)
    left, right, ids, atts = _inputs(arch, seed=5)
    with torch.no_grad():
        if task == "nlvr2":
            r = ref.nlvr2_forward(official_full, left, right, ids, atts, spec, arch.image_res, arch.window)["logits"]
            h = model(pixel_values=torch.stack([left, right], dim=1), input_ids=ids, attention_mask=atts).logits
        else:
            pairs = ([0, 1, 2], [2, 0, 1], [0, 1, 2])
            r = ref.ta_forward(official_full, left, ids, atts, spec, arch.image_res, arch.window, pairs)["logits"]
            h = model(pixel_values=left, input_ids=ids, attention_mask=atts,
                      pair_index=torch.tensor(pairs[:2]).t()).logits
    assert _max_diff(r, h) <= TOL


def test_text_assignment_checkpoint_into_nlvr2():
    """`load_nlvr_pretrain=True`: a TA checkpoint's keys load as they are; vision_proj / ta_head are dropped and
    cls_head is new."""
    arch = tiny_arch()
    sd = official_state_dict(arch, "nlvr2-pretrain", seed=24)
    model, result = _convert_in_memory(sd, "nlvr2", arch)
    assert list(result.new) == ["cls_head."]
    assert {k.split(".")[0] for k, r in result.dropped.items() if "not part of" in r} == {"vision_proj", "ta_head"}
    key = "encoder.layer.5.crossattention.self.query.weight"
    assert torch.equal(model.state_dict()[TEXT + key], sd["text_encoder." + key])


def test_cli_nlvr2_end_to_end(tmp_path, capsys):
    """`xvlm-convert --task nlvr2` (detected) with the official YAML (its config_bert.json describes the 4-layer
    pre-training stack; the NLVR2 model doubles the fusion layers), then `from_pretrained` and parity."""
    arch = tiny_arch()
    sd = official_state_dict(arch, "nlvr2", seed=25)
    checkpoint = tmp_path / "checkpoint_best.pth"
    torch.save({"model": sd, "config": {"image_res": arch.image_res}}, checkpoint)
    yaml_path = official_task_files(tmp_path, arch, name="NLVR.yaml")
    out = tmp_path / "converted"
    from modeling_xvlm.conversion.__main__ import main

    assert main(["--checkpoint", str(checkpoint), "--output", str(out), "--config", yaml_path, "--no-tokenizer"]) == 0
    printed = capsys.readouterr().out
    assert "Detected task: nlvr2" in printed and "dropped 8 x NLVR2 cross-attention" in printed  # 2 pairs x key/value x weight/bias
    readme = (out / "README.md").read_text()
    assert "XVLMForImagesAndTextClassification" in readme
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_xvlm_nlvr.XVLMForImagesAndTextClassification")
    assert config["auto_map"]["AutoModel"] == "modeling_xvlm.XVLMModel"
    assert config["text_config"]["tie_cross_attention_pairs"] is True
    model = head_class("nlvr2").from_pretrained(out).eval()
    left, right, ids, atts = _inputs(arch, seed=7)
    with torch.no_grad():
        r = ref.nlvr2_forward(sd, left, right, ids, atts, _spec(arch), arch.image_res, arch.window)["logits"]
        h = model(pixel_values=torch.stack([left, right], dim=1), input_ids=ids, attention_mask=atts).logits
    assert _max_diff(r, h) <= TOL
    # a pre-training checkpoint converted for NLVR2 through the API reports the new head
    pre = official_state_dict(arch, "pretrain", seed=26)
    _, result = convert_checkpoint({"model": pre}, task="nlvr2", config=yaml_path, log=None)
    assert "cls_head." in result.new and any("converted a pretrain checkpoint" in n for n in result.notes)
