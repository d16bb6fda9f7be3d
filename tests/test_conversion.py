"""Official X-VLM checkpoint conversion (issue #5): key accounting, qkv split, table resizing, safe loading, CLI,
and numerical parity of the converted model with an independent re-implementation of the official forward
(`official_reference.py`) on official-format state dicts (`official_format.py`)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import official_reference as ref  # noqa: E402
from official_format import (  # noqa: E402
    base_arch,
    official_state_dict,
    official_task_files,
    sequence_diffs,
    tiny_arch,
)

from modeling_xvlm.conversion import (  # noqa: E402
    ConversionError,
    UnsafeCheckpointError,
    bisect_ratio,
    build_config,
    convert_checkpoint,
    convert_state_dict,
    detect_task,
    head_class,
    infer_architecture,
    interpolate_relative_position_bias_table,
    load_into_model,
    load_official_checkpoint,
    not_a_knot_spline_matrix,
    read_official_config,
    source_grid,
)
from modeling_xvlm.conversion.official_config import OfficialConfig  # noqa: E402
from modeling_xvlm.conversion.relative_position import target_grid  # noqa: E402

TOL = 1e-5
TASKS = ("pretrain", "retrieval", "grounding")


def _tiny_official_config(arch) -> OfficialConfig:
    """What the weights cannot tell (the text head count), as an official config would."""
    return OfficialConfig(text={"num_attention_heads": arch.text_heads})


def _convert_in_memory(sd, task, arch, image_size=None):
    config, inference = build_config(sd, _tiny_official_config(arch), image_size=image_size)
    window = config.vision_config.window_size
    same_geometry = window == inference.source_window and config.image_size == inference.source_image
    result = convert_state_dict(sd, task, target_window=None if same_geometry else window)
    result.config = config
    model = head_class(task)(config)
    load_into_model(result, model)
    return model.eval(), result


# ----------------------------------------------------------------------------------------------------------------
# Relative position tables
# ----------------------------------------------------------------------------------------------------------------


def test_bisection_ratio_matches_reference_values():
    assert bisect_ratio(13, 23) == pytest.approx(1.2407240, abs=1e-6)
    assert bisect_ratio(13, 29) == pytest.approx(1.3375150, abs=1e-6)
    grid = source_grid(13, 23)
    np.testing.assert_allclose(grid[6:], [0, 1, 2.2407, 3.7801, 5.6901, 8.0598, 11.0], atol=1e-4)
    # The bisection is capped at 1.5: a 5 -> 11 grid ends short of +-5 (official-xvlm.md §3.3).
    assert source_grid(5, 11)[-1] == pytest.approx(2.4999991, abs=1e-6)


def test_table_unchanged_when_window_does_not_change():
    table = torch.randn(169, 4)
    assert interpolate_relative_position_bias_table(table, 7) is table


def test_resized_table_keeps_values_on_shared_grid_points():
    """Offsets 0 and +-1 are source grid points and targets: the interpolating spline keeps them exactly."""
    table = torch.randn(13 * 13, 3)
    out = interpolate_relative_position_bias_table(table, 12)
    src = table.T.reshape(3, 13, 13)
    dst = out.T.reshape(3, 23, 23)
    for a, b in ((-1, -1), (0, 0), (1, 1)):
        for c, d in ((-1, -1), (0, 0), (1, 1)):
            torch.testing.assert_close(dst[:, 11 + a, 11 + c], src[:, 6 + b, 6 + d], atol=1e-5, rtol=0)


def test_resized_table_hand_checked_cubic():
    """A bicubic polynomial of the *grid positions* is reproduced exactly (a cubic spline contains it); targets
    beyond the (capped) source grid are clamped to its edge, as FITPACK does: 5x5 -> 7x7 (window 3 -> 4)."""

    def poly(x, y):
        return 0.5 + 0.25 * x - 0.1 * y + 0.03 * x * y + 0.02 * x**3 - 0.01 * y**2 * x

    grid = source_grid(5, 7)  # q capped at ~1.5: [-2.5, -1, 0, 1, 2.5]
    np.testing.assert_allclose(grid, [-2.5, -1, 0, 1, 2.5], atol=2e-6)
    heads = []
    for scale in (1.0, -2.0):
        z = scale * poly(grid[None, :], grid[:, None])  # rows = dh (y), columns = dw (x)
        heads.append(torch.tensor(z, dtype=torch.float32).reshape(-1))
    table = torch.stack(heads, dim=1)
    out = interpolate_relative_position_bias_table(table, 4)
    assert out.shape == (49, 2) and out.dtype == torch.float32
    targets = np.clip(np.arange(-3, 4, dtype=np.float64), grid[0], grid[-1])  # +-3 clamped to +-2.5
    for h, scale in enumerate((1.0, -2.0)):
        expected = scale * poly(targets[None, :], targets[:, None])
        np.testing.assert_allclose(out[:, h].reshape(7, 7).numpy(), expected, atol=1e-5)
    # Hand value: offset (dh, dw) = (2, -2) -> poly(x=-2, y=2) = 0.5 - 0.5 - 0.2 - 0.12 - 0.16 + 0.08 = -0.4
    assert out[(2 + 3) * 7 + (-2 + 3), 0].item() == pytest.approx(-0.4, abs=1e-5)


@pytest.mark.parametrize("src_window,dst_window", [(7, 12), (7, 15), (3, 6), (5, 8), (12, 7)])
def test_resized_table_matches_scipy_rect_bivariate_spline(src_window, dst_window):
    """`RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)` is the documented stand-in for the removed `interp2d`."""
    scipy_interpolate = pytest.importorskip("scipy.interpolate")
    src, dst = 2 * src_window - 1, 2 * dst_window - 1
    table = torch.randn(src * src, 2, generator=torch.Generator().manual_seed(src + dst))
    out = interpolate_relative_position_bias_table(table, dst_window)
    x, t = source_grid(src, dst), target_grid(dst)
    for h in range(2):
        z = table[:, h].view(src, src).numpy().astype(np.float64)
        expected = scipy_interpolate.RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)(t, t).astype(np.float32)
        np.testing.assert_allclose(out[:, h].view(dst, dst).numpy(), expected, atol=1e-6, rtol=0)


def test_spline_matrix_rejects_too_few_points_and_meta_tables_keep_shape():
    with pytest.raises(ValueError, match="at least 4"):
        not_a_knot_spline_matrix(np.array([-1.0, 0.0, 1.0]), np.array([0.5]))
    meta = torch.empty(169, 32, device="meta")
    assert interpolate_relative_position_bias_table(meta, 12).shape == (529, 32)


# ----------------------------------------------------------------------------------------------------------------
# Key accounting
# ----------------------------------------------------------------------------------------------------------------


BASE_PARAMS = {("pretrain", 224): 215_637_241, ("retrieval", 384): 213_959_547, ("grounding", 384): 213_503_356}


@pytest.mark.parametrize("task,image_res", [("pretrain", 224), ("retrieval", 384), ("grounding", 384)])
def test_base_key_accounting_on_meta(task, image_res):
    """Base size, shapes only: every official key is mapped or deliberately dropped, the result fills the head model
    exactly (no missing, unexpected or mis-shaped weight) and the parameter count is the official one."""
    sd = official_state_dict(base_arch(image_res), task, device="meta")
    assert len(sd) == {"pretrain": 644, "retrieval": 631, "grounding": 626}[task]
    assert detect_task(sd) == task
    config, inference = build_config(sd, image_size=image_res)
    assert config.vision_config.window_size == {224: 7, 384: 12}[image_res]
    assert inference.vision["depths"] == [2, 2, 18, 2] and inference.vision["num_heads"] == [4, 8, 16, 32]
    assert inference.text["fusion_layer"] == 6 and inference.text["num_hidden_layers"] == 12
    assert inference.text["num_attention_heads"] == 12  # base fallback (head size 64)
    result = convert_state_dict(sd, task, target_window=config.vision_config.window_size)
    assert set(result.mapping) | set(result.dropped) == set(sd)
    assert not set(result.mapping) & set(result.dropped)
    buffers = [k for k in result.dropped if k.endswith(("relative_position_index", "attn_mask", "position_ids"))]
    assert len(buffers) == 36
    assert len(result.dropped) == (38 if task == "pretrain" else 36)
    # qkv keys become three tensors each (24 blocks x weight/bias)
    assert len(result.state_dict) == len(result.mapping) + 2 * 48
    with torch.device("meta"):
        model = head_class(task)(config)
    load_into_model(result, model)
    unique = sum(p.numel() for p in model.parameters())
    assert unique == BASE_PARAMS[(task, image_res)]


@pytest.mark.parametrize("task", ["retrieval", "grounding"])
def test_base_pretrain_checkpoint_into_384_task_model_on_meta(task):
    """The official fine-tuning start: a 224/w7 pre-training checkpoint into a 384/w12 model (tables resized,
    heads the task lacks dropped with a reason)."""
    sd = official_state_dict(base_arch(224), "pretrain", device="meta")
    config, _ = build_config(sd, image_size=384)
    assert config.vision_config.window_size == 12 and config.image_size == 384
    result = convert_state_dict(sd, task, target_window=12)
    assert len(result.interpolated) == 24 and set(result.interpolated.values()) == {(7, 12)}
    table = "xvlm.vision_model.encoder.layers.2.blocks.5.attention.relative_position_bias.relative_position_bias_table"
    assert tuple(result.state_dict[table].shape) == (529, 16)
    dropped_heads = {k.split(".")[0] for k, reason in result.dropped.items() if "not part of" in reason}
    assert dropped_heads == ({"text_encoder", "bbox_head"} if task == "retrieval" else
                             {"text_encoder", "itm_head", "vision_proj", "text_proj", "temp"})
    with torch.device("meta"):
        model = head_class(task)(config)
    load_into_model(result, model)


def test_unknown_missing_and_mismatched_keys_are_errors_naming_them():
    arch = tiny_arch()
    sd = official_state_dict(arch, "retrieval")
    bad = dict(sd, **{"text_decoder.bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "cls_head.0.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"text_decoder\.bert\.embeddings\.word_embeddings\.weight") as info:
        convert_state_dict(bad, "retrieval")
    assert "cls_head.0.weight" in str(info.value)
    with pytest.raises(ConversionError, match=r"itm_head\.0\.weight"):
        convert_state_dict({k: v for k, v in sd.items() if not k.startswith("itm_head.")}, "retrieval")
    with pytest.raises(ConversionError, match=r"bbox_head"):
        convert_state_dict(sd, "pretrain")
    # A weight the model does not hold at that shape is named with its official key.
    config, _ = build_config(sd, _tiny_official_config(arch))
    result = convert_state_dict(sd, "retrieval", target_window=config.vision_config.window_size)
    key = "xvlm.text_model.encoder.layer.0.intermediate.dense.weight"
    result.state_dict[key] = torch.zeros(3, 3)
    with pytest.raises(ConversionError, match=r"text_encoder\.encoder\.layer\.0\.intermediate\.dense\.weight"):
        load_into_model(result, head_class("retrieval")(config))


def test_untied_mlm_decoder_is_refused():
    sd = official_state_dict(tiny_arch(), "pretrain")
    sd["text_encoder.cls.predictions.decoder.weight"] = sd["text_encoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ConversionError, match="tied"):
        convert_state_dict(sd, "pretrain")


@pytest.mark.parametrize("task", TASKS)
def test_tiny_every_tensor_lands_where_it_should(task):
    arch = tiny_arch()
    sd = official_state_dict(arch, task)
    model, result = _convert_in_memory(sd, task, arch)
    state = model.state_dict()
    v = "xvlm.vision_model."
    tp = "text_encoder.bert." if task == "pretrain" else "text_encoder."
    expected = {
        v + "embeddings.patch_embeddings.projection.weight": sd["vision_encoder.patch_embed.proj.weight"],
        v + "embeddings.norm.bias": sd["vision_encoder.patch_embed.norm.bias"],
        v + "encoder.layers.1.blocks.1.layernorm_before.weight": sd["vision_encoder.layers.1.blocks.1.norm1.weight"],
        v + "encoder.layers.1.blocks.1.layernorm_after.bias": sd["vision_encoder.layers.1.blocks.1.norm2.bias"],
        v + "encoder.layers.0.blocks.1.attention.o_proj.weight": sd["vision_encoder.layers.0.blocks.1.attn.proj.weight"],
        v + "encoder.layers.2.blocks.0.attention.relative_position_bias.relative_position_bias_table":
            sd["vision_encoder.layers.2.blocks.0.attn.relative_position_bias_table"],
        v + "encoder.layers.0.blocks.0.mlp.fc2.bias": sd["vision_encoder.layers.0.blocks.0.mlp.fc2.bias"],
        v + "encoder.layers.1.downsample.reduction.weight": sd["vision_encoder.layers.1.downsample.reduction.weight"],
        v + "encoder.layers.0.downsample.norm.weight": sd["vision_encoder.layers.0.downsample.norm.weight"],
        v + "layernorm.weight": sd["vision_encoder.norm.weight"],
        "xvlm.text_model.embeddings.word_embeddings.weight": sd[tp + "embeddings.word_embeddings.weight"],
        "xvlm.text_model.encoder.layer.3.crossattention.self.key.weight":
            sd[tp + "encoder.layer.3.crossattention.self.key.weight"],
        "xvlm.text_model.encoder.layer.1.output.LayerNorm.bias": sd[tp + "encoder.layer.1.output.LayerNorm.bias"],
    }
    if task != "grounding":
        expected.update({"xvlm.vision_proj.weight": sd["vision_proj.weight"], "xvlm.temp": sd["temp"],
                         "itm_head.3.bias": sd["itm_head.3.bias"], "itm_head.1.weight": sd["itm_head.1.weight"]})
    if task != "retrieval":
        expected["bbox_head.0.weight"] = sd["bbox_head.0.weight"]
    if task == "pretrain":
        expected.update({
            "mlm_head.transform.dense.weight": sd["text_encoder.cls.predictions.transform.dense.weight"],
            "mlm_head.transform.LayerNorm.bias": sd["text_encoder.cls.predictions.transform.LayerNorm.bias"],
            "mlm_head.decoder.bias": sd["text_encoder.cls.predictions.bias"],
        })
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    if task == "pretrain":
        assert model.mlm_head.decoder.weight is model.xvlm.text_model.embeddings.word_embeddings.weight
    # Every official parameter's values appear in the converted model (qkv in three parts).
    assert set(result.mapping) | set(result.dropped) == set(sd)
    for source, targets in result.mapping.items():
        joined = torch.cat([state[t].reshape(-1) for t in targets]) if len(targets) > 1 else state[targets[0]].reshape(-1)
        assert torch.equal(joined, sd[source].reshape(-1)), source


def test_qkv_split_order_and_attention_equivalence():
    arch = tiny_arch()
    sd = official_state_dict(arch, "retrieval")
    model, _ = _convert_in_memory(sd, "retrieval", arch)
    attention = model.xvlm.vision_model.encoder.layers[1].blocks[1].attention
    qkv_w = sd["vision_encoder.layers.1.blocks.1.attn.qkv.weight"]
    qkv_b = sd["vision_encoder.layers.1.blocks.1.attn.qkv.bias"]
    c = qkv_w.shape[1]
    for i, proj in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        assert torch.equal(proj.weight, qkv_w[i * c : (i + 1) * c])
        assert torch.equal(proj.bias, qkv_b[i * c : (i + 1) * c])
    x = torch.randn(2, 16, c)
    fused = torch.nn.functional.linear(x, qkv_w, qkv_b)
    split = torch.cat([attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)], dim=-1)
    torch.testing.assert_close(split, fused, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Architecture inference and official configs
# ----------------------------------------------------------------------------------------------------------------


def test_inference_reads_the_architecture_from_the_weights(tmp_path):
    arch = tiny_arch()
    sd = official_state_dict(arch, "pretrain")
    inference = infer_architecture(sd)
    assert inference.vision["image_size"] == 64 and inference.image_size_known
    assert inference.vision["window_size"] == 4 and inference.vision["depths"] == [2, 2, 2]
    assert inference.vision["num_heads"] == [2, 2, 4] and inference.vision["embed_dim"] == 8
    assert inference.text["hidden_size"] == 24 and inference.text["fusion_layer"] == 2
    assert inference.text["num_hidden_layers"] == 4 and inference.text["intermediate_size"] == 48
    assert inference.text["encoder_width"] == 32 and inference.top["projection_dim"] == 16
    assert inference.provenance["text.num_attention_heads"].startswith("default")
    # The official YAML + JSONs give the rest (and conflicting values are refused).
    yaml_path = official_task_files(tmp_path, arch)
    official = read_official_config(yaml_path)
    assert official.text["num_attention_heads"] == 2 and official.vision["window_size"] == 4
    config, _ = build_config(sd, official)
    assert config.text_config.num_attention_heads == 2 and config.text_config.encoder_width == 32
    official.vision["embed_dim"] = 16
    with pytest.raises(ConversionError, match="embed_dim"):
        build_config(sd, official)


def test_official_yaml_sets_the_target_resolution(tmp_path):
    """A 64/w4 pre-training checkpoint with a task YAML for 128 / window 8 (like Retrieval_coco.yaml for the
    224 checkpoint): the YAML's window wins over the checkpoint's, and the tables are resized."""
    arch = tiny_arch()
    sd = official_state_dict(arch, "pretrain", device="meta")
    yaml_path = official_task_files(tmp_path, tiny_arch(image_res=128, window=8), name="Retrieval_tiny.yaml")
    config, _ = build_config(sd, read_official_config(yaml_path))
    assert (config.image_size, config.vision_config.window_size) == (128, 8)
    assert config.text_config.num_attention_heads == 2
    result = convert_state_dict(sd, "retrieval", target_window=8)
    assert set(result.interpolated.values()) == {(4, 8)}


def test_unsupported_stage_geometry_is_refused():
    sd = official_state_dict(tiny_arch(), "retrieval", device="meta")
    with pytest.raises(ConversionError, match="not a multiple of the window"):
        build_config(sd, image_size=64, window_size=6)


# ----------------------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------------------


class _Malicious:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(
        {"model": {"x": torch.zeros(1)}, "config": _Malicious(str(marker))}, path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        load_official_checkpoint(path)
    assert not marker.exists()
    from modeling_xvlm.conversion.__main__ import main

    assert main(["--checkpoint", str(path), "--task", "retrieval", "--output", str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_safe_loader_reads_official_style_files(tmp_path, legacy):
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    path = tmp_path / "model_state_epoch_0.th"
    config = {"image_res": 384, "optimizer": {"opt": "adamW", "lr": "3e-5"}, "train_file": ["a"], "temp": 0.07}
    torch.save({"model": module.state_dict(), "config": config}, path, _use_new_zipfile_serialization=not legacy)
    from modeling_xvlm.conversion import split_checkpoint

    state_dict, embedded = split_checkpoint(load_official_checkpoint(path))
    assert list(state_dict) == ["0.weight", "0.bias", "1.weight", "1.bias"] and embedded == config


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official forward
# ----------------------------------------------------------------------------------------------------------------


def _inputs(arch, n_images=2, n_texts=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, arch.image_res, arch.image_res, generator=g)
    ids = torch.randint(5, arch.vocab, (n_texts, length), generator=g)
    ids[:, 0] = 2
    atts = torch.ones(n_texts, length, dtype=torch.long)
    atts[1, 4:] = 0
    if n_texts > 2:
        atts[2, 6:] = 0
    ids[atts == 0] = 0
    return images, ids, atts


def _region_masks(arch, image_index):
    grid = arch.image_res // (arch.patch * 2 ** (len(arch.depths) - 1))
    masks = torch.zeros(len(image_index), 1 + grid * grid, dtype=torch.long)
    masks[:, 0] = 1
    boxes = [(0, 0, 1, 2), (1, 1, 3, 3), (0, 2, 4, 4)]
    for r in range(len(image_index)):
        y0, x0, y1, x1 = boxes[r % len(boxes)]
        cells = torch.zeros(grid, grid, dtype=torch.long)
        cells[y0:y1, x0:x1] = 1
        masks[r, 1:] = cells.flatten()
    return masks


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
@pytest.mark.parametrize("window", [4, 8], ids=["window4", "shrunk-window8"])
def test_parity_pretrain_tiny_all_quantities(window, padding_free):
    # window 8 at 64 px: stage 2 (4x4) is below the window and gets window = resolution, as the official Swin.
    arch = tiny_arch(window=window)
    sd = official_state_dict(arch, "pretrain", seed=3)
    model, _ = _convert_in_memory(sd, "pretrain", arch)
    xvlm = model.xvlm
    xvlm.text_model.config.padding_free = padding_free
    spec = ref.TextSpec(arch.text_heads, arch.fusion, arch.layers)
    images, ids, atts = _inputs(arch)
    image_index = torch.tensor([0, 1, 1])
    region_atts = _region_masks(arch, image_index)
    diffs = {}
    with torch.no_grad():
        # vision: full images and regions
        patches = ref.swin_patch_tokens(sd, images, arch.image_res, arch.window)
        r_full = ref.image_sequence(patches)
        r_region = ref.region_sequence(patches, image_index, region_atts)
        h_full = xvlm.encode_image(images).last_hidden_state
        h_region = xvlm.region_sequence(h_full, region_atts, image_index)
        diffs["vision_full"] = _max_diff(r_full, h_full)
        diffs["vision_region"] = _max_diff(r_region, h_region)
        # text encoder
        r_text = ref.text_mode(sd, ids, atts, spec)
        h_text_out = xvlm.get_text_features(ids, atts)
        # padding-free: the real tokens equal the official states, the padded positions are 0; padded: every position
        diffs.update(sequence_diffs("text", r_text, h_text_out.last_hidden_state, atts, padding_free))
        # fusion on regions (region mask = cross-attention key mask)
        r_fused = ref.fusion_mode(sd, r_text, atts, r_region, region_atts, spec)
        h_fused = xvlm.fuse(h_text_out.last_hidden_state, atts, h_region, region_atts)
        diffs.update(sequence_diffs("fusion", r_fused, h_fused, atts, padding_free))
        # ITC features, similarities, loss
        r_img_feat, r_txt_feat = ref.itc_features(sd, r_region, r_text)
        h_img_feat = xvlm.get_region_features(images, region_atts, image_index).pooler_output
        diffs["itc_image_feat"] = _max_diff(r_img_feat, h_img_feat)
        diffs["itc_text_feat"] = _max_diff(r_txt_feat, h_text_out.pooler_output)
        r_sim = r_img_feat @ r_txt_feat.t() / sd["temp"]
        h_sim = h_img_feat @ h_text_out.pooler_output.t() / xvlm.temp
        diffs["itc_similarity"] = _max_diff(r_sim, h_sim)
        r_itc = ref.itc_loss(r_img_feat, r_txt_feat, sd["temp"])
        from modeling_xvlm.losses import image_text_contrastive_loss

        diffs["itc_loss"] = _max_diff(r_itc, image_text_contrastive_loss(h_img_feat, h_text_out.pooler_output, xvlm.temp))
        r_itc_idx = ref.itc_loss(r_img_feat, r_txt_feat, sd["temp"], idx=image_index)
        h_itc_idx = image_text_contrastive_loss(h_img_feat, h_text_out.pooler_output, xvlm.temp, image_ids=image_index)
        diffs["itc_loss_idx"] = _max_diff(r_itc_idx, h_itc_idx)
        # ITM logits and loss with fixed negatives
        neg_images, neg_texts = [1, 2, 0], [2, 0, 1]
        r_itm_logits, r_itm_loss = ref.itm_logits_and_loss(sd, r_region, region_atts, r_text, atts, neg_images, neg_texts, spec)
        pos = xvlm.fuse(h_text_out.last_hidden_state, atts, h_region, region_atts)[:, 0]
        neg = xvlm.fuse(
            torch.cat([h_text_out.last_hidden_state, h_text_out.last_hidden_state[neg_texts]]),
            torch.cat([atts, atts[neg_texts]]),
            torch.cat([h_region[neg_images], h_region]),
            torch.cat([region_atts[neg_images], region_atts]),
        )[:, 0]
        h_itm_logits = model.itm_head(torch.cat([pos, neg]))
        diffs["itm_logits"] = _max_diff(r_itm_logits, h_itm_logits)
        labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
        diffs["itm_loss"] = _max_diff(r_itm_loss, torch.nn.functional.cross_entropy(h_itm_logits, labels))
        # MLM logits and loss (multi-modal mode over the region sequences, gathered masked positions)
        masked_pos = torch.tensor([[1, 3], [2, 0], [1, 5]])
        masked_ids = torch.tensor([[7, 9], [11, -100], [13, 17]])
        r_mm = ref.multi_modal_mode(sd, ids, atts, r_region, region_atts, spec)
        r_mlm = ref.mlm_logits(sd, r_mm, masked_pos, spec)
        h_mm = xvlm.text_model(ids, atts, encoder_hidden_states=h_region, encoder_attention_mask=region_atts).last_hidden_state
        gathered = torch.gather(h_mm, 1, masked_pos.unsqueeze(-1).expand(-1, -1, h_mm.shape[-1]))
        h_mlm = model.mlm_head(gathered)
        diffs["mlm_logits"] = _max_diff(r_mlm, h_mlm)
        diffs["mlm_loss"] = _max_diff(ref.mlm_loss(r_mlm, masked_ids), ref.mlm_loss(h_mlm, masked_ids))
        # Boxes: full-image embeddings of each text's image, all-ones mask
        r_box = ref.predict_bbox(sd, r_full[image_index], r_text, atts, spec)
        h_box = model.bbox_head(xvlm.fuse(h_text_out.last_hidden_state, atts, h_full[image_index])[:, 0]).sigmoid()
        diffs["box"] = _max_diff(r_box, h_box)
        target = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.5], [0.7, 0.4, 0.3, 0.3]])
        r_l1, r_giou = ref.bbox_losses(r_box, target)
        from modeling_xvlm.losses import bbox_losses

        h_l1, h_giou = bbox_losses(h_box, target)
        diffs["box_l1"] = _max_diff(r_l1, h_l1)
        diffs["box_giou"] = _max_diff(r_giou, h_giou)
    print(json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    worst = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not worst, worst


def test_parity_after_resolution_change():
    """A 64/w4 pre-training checkpoint converted for 128 (window 8): the tables are resized, and the converted model
    matches the official model built at 128 from the same checkpoint through the official loader (tables resized
    with SciPy's RectBivariateSpline here, independently of the converter)."""
    scipy_interpolate = pytest.importorskip("scipy.interpolate")
    arch = tiny_arch()
    sd = official_state_dict(arch, "pretrain", seed=5)
    model, result = _convert_in_memory(sd, "retrieval", arch, image_size=128)
    assert model.config.vision_config.window_size == 8 and len(result.interpolated) == 6
    official_384 = {}
    for key, value in sd.items():
        if key.endswith("relative_position_bias_table"):
            src, dst = 7, 15
            x, t = source_grid(src, dst), target_grid(dst)
            heads = [
                torch.tensor(
                    scipy_interpolate.RectBivariateSpline(x, x, value[:, h].view(src, src).double().numpy(), kx=3, ky=3, s=0)(t, t),
                    dtype=torch.float32,
                ).reshape(-1, 1)
                for h in range(value.shape[1])
            ]
            official_384[key] = torch.cat(heads, dim=1)
        elif not key.endswith(("relative_position_index", "attn_mask")):
            official_384[key] = value
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.image_sequence(ref.swin_patch_tokens(official_384, images, 128, 8))
        got = model.xvlm.encode_image(images).last_hidden_state
    assert got.shape == (2, 1 + 64, 32)
    assert _max_diff(expected, got) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# CLI end to end
# ----------------------------------------------------------------------------------------------------------------


def test_cli_end_to_end_and_from_pretrained(tmp_path, tiny_vocab, capsys):
    arch = tiny_arch(vocab=len(tiny_vocab))
    sd = official_state_dict(arch, "retrieval", seed=7)
    checkpoint = tmp_path / "checkpoint_best.pth"
    torch.save({"model": sd, "config": {"image_res": arch.image_res, "embed_dim": arch.proj, "temp": 0.07}}, checkpoint)
    yaml_path = official_task_files(tmp_path, arch)
    vocab_dir = tmp_path / "bert"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.txt").write_text("\n".join(sorted(tiny_vocab, key=tiny_vocab.get)) + "\n")
    out = tmp_path / "converted"
    from modeling_xvlm.conversion.__main__ import main

    code = main([
        "--checkpoint", str(checkpoint), "--task", "retrieval", "--output", str(out), "--image-size", "64",
        "--config", yaml_path, "--tokenizer", str(vocab_dir),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "inferred from patch_embed.proj.weight" in printed and "from --config" in printed
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= files, files
    assert files & {"processor_config.json", "preprocessor_config.json"}, files
    readme = (out / "README.md").read_text()
    front = readme.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag:" in front
    assert "original_checkpoint: checkpoint_best.pth" in front
    model = head_class("retrieval").from_pretrained(out).eval()
    images, ids, atts = _inputs(arch, n_images=3, n_texts=3)
    spec = ref.TextSpec(arch.text_heads, arch.fusion, arch.layers)
    with torch.no_grad():
        r_image = ref.image_sequence(ref.swin_patch_tokens(sd, images, arch.image_res, arch.window))
        r_text = ref.text_mode(sd, ids, atts, spec)
        r_fused = ref.fusion_mode(sd, r_text, atts, r_image, torch.ones(r_image.shape[:2]), spec)
        r_itm = ref.mlp_head(sd, "itm_head", r_fused[:, 0])
        h_image = model.xvlm.encode_image(images).last_hidden_state
        h_text = model.xvlm.get_text_features(ids, atts).last_hidden_state
        h_itm = model.itm_head(model.xvlm.fuse(h_text, atts, h_image)[:, 0])
    assert _max_diff(r_itm, h_itm) <= TOL
    from modeling_xvlm.processing import XVLMProcessor

    processor = XVLMProcessor.from_pretrained(out)
    assert processor.image_processor.input_size == (64, 64)


def test_api_converts_loaded_dicts_and_detects_the_task():
    arch = tiny_arch()
    sd = official_state_dict(arch, "grounding")
    model, result = convert_checkpoint({"model": sd}, task=None, log=None)
    assert result.task == "grounding" and type(model).__name__ == "XVLMForGrounding"


# ----------------------------------------------------------------------------------------------------------------
# Parity through the heads' forward methods (batch of 2: the hard negatives are then deterministic)
# ----------------------------------------------------------------------------------------------------------------


def test_parity_pretraining_forward_losses():
    arch = tiny_arch()
    sd = official_state_dict(arch, "pretrain", seed=11)
    model, _ = _convert_in_memory(sd, "pretrain", arch)
    spec = ref.TextSpec(arch.text_heads, arch.fusion, arch.layers)
    images, ids, atts = _inputs(arch, n_images=2, n_texts=2, seed=4)
    image_index = torch.tensor([0, 1])
    region_atts = _region_masks(arch, image_index)
    region_atts[1] = 1  # a whole-image caption in the region batch
    is_image = torch.tensor([0, 1])
    masked_pos = torch.tensor([[1, 2], [3, 0]])  # official: padded slot has pos 0 and label -100
    masked_ids = torch.tensor([[7, 9], [11, -100]])
    mlm_ids = ids.clone()
    mlm_labels = torch.full_like(ids, -100)
    for b in range(2):
        for pos, label in zip(masked_pos[b].tolist(), masked_ids[b].tolist()):
            if label != -100:
                mlm_ids[b, pos] = 4  # [MASK]
                mlm_labels[b, pos] = label
    target = torch.tensor([[0.4, 0.5, 0.3, 0.4], [0.5, 0.5, 1.0, 1.0]])
    with torch.no_grad():
        patches = ref.swin_patch_tokens(sd, images, arch.image_res, arch.window)
        region = ref.region_sequence(patches, image_index, region_atts)
        full = ref.image_sequence(patches)[image_index]
        text = ref.text_mode(sd, ids, atts, spec)
        image_feat, text_feat = ref.itc_features(sd, region, text)
        r_itc = ref.itc_loss(image_feat, text_feat, sd["temp"])
        r_itm_logits, r_itm = ref.itm_logits_and_loss(sd, region, region_atts, text, atts, [1, 0], [1, 0], spec)
        r_mlm_logits = ref.mlm_logits(sd, ref.multi_modal_mode(sd, mlm_ids, atts, region, region_atts, spec), masked_pos, spec)
        r_mlm = ref.mlm_loss(r_mlm_logits, masked_ids)
        r_box = ref.predict_bbox(sd, full, text, atts, spec)
        r_l1, r_giou = ref.bbox_losses(r_box, target, is_image)
        out = model(
            pixel_values=images, input_ids=ids, attention_mask=atts, image_index=image_index, region_masks=region_atts,
            mlm_input_ids=mlm_ids, mlm_labels=mlm_labels, labels=target, is_image=is_image, return_loss=True,
        )
    valid = masked_ids.reshape(-1) != -100
    diffs = {
        "logits_per_image": _max_diff(image_feat @ text_feat.t() / sd["temp"], out.logits_per_image),
        "loss_itc": _max_diff(r_itc, out.loss_itc),
        "itm_logits": _max_diff(r_itm_logits, out.itm_logits),
        "loss_itm": _max_diff(r_itm, out.loss_itm),
        "mlm_logits": _max_diff(r_mlm_logits.reshape(-1, arch.vocab)[valid], out.mlm_logits),
        "loss_mlm": _max_diff(r_mlm, out.loss_mlm),
        "pred_boxes": _max_diff(r_box, out.pred_boxes),
        "loss_bbox_l1": _max_diff(r_l1, out.loss_bbox_l1),
        "loss_bbox_giou": _max_diff(r_giou, out.loss_bbox_giou),
    }
    print(json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    assert all(v <= TOL for v in diffs.values()), diffs


def test_parity_retrieval_and_grounding_forwards():
    arch = tiny_arch()
    spec = ref.TextSpec(arch.text_heads, arch.fusion, arch.layers)
    images, ids, atts = _inputs(arch, n_images=2, n_texts=2, seed=6)
    sd = official_state_dict(arch, "retrieval", seed=12)
    model, _ = _convert_in_memory(sd, "retrieval", arch)
    with torch.no_grad():
        image = ref.image_sequence(ref.swin_patch_tokens(sd, images, arch.image_res, arch.window))
        text = ref.text_mode(sd, ids, atts, spec)
        image_feat, text_feat = ref.itc_features(sd, image, text)
        ones = torch.ones(image.shape[:2], dtype=torch.long)
        r_itm_logits, r_itm = ref.itm_logits_and_loss(sd, image, ones, text, atts, [1, 0], [1, 0], spec)
        out = model(pixel_values=images, input_ids=ids, attention_mask=atts, return_loss=True)
        scores = model.itm_scores(pixel_values=images, input_ids=ids, attention_mask=atts)
    diffs = {
        "retrieval.logits_per_image": _max_diff(image_feat @ text_feat.t() / sd["temp"], out.logits_per_image),
        "retrieval.loss_itc": _max_diff(ref.itc_loss(image_feat, text_feat, sd["temp"]), out.loss_itc),
        "retrieval.loss_itm": _max_diff(r_itm, out.loss_itm),
        "retrieval.itm_logits": _max_diff(r_itm_logits[:2], out.itm_logits),
        "retrieval.itm_scores": _max_diff(r_itm_logits[:2, 1], scores),
    }
    sd = official_state_dict(arch, "grounding", seed=13)
    model, _ = _convert_in_memory(sd, "grounding", arch)
    target = torch.tensor([[0.4, 0.5, 0.3, 0.4], [0.6, 0.3, 0.5, 0.2]])
    with torch.no_grad():
        image = ref.image_sequence(ref.swin_patch_tokens(sd, images, arch.image_res, arch.window))
        text = ref.text_mode(sd, ids, atts, spec)
        r_box = ref.predict_bbox(sd, image, text, atts, spec)
        r_l1, r_giou = ref.bbox_losses(r_box, target)
        out = model(pixel_values=images, input_ids=ids, attention_mask=atts, labels=target)
    diffs.update({
        "grounding.pred_boxes": _max_diff(r_box, out.pred_boxes),
        "grounding.loss_bbox_l1": _max_diff(r_l1, out.loss_bbox_l1),
        "grounding.loss_bbox_giou": _max_diff(r_giou, out.loss_bbox_giou),
    })
    print(json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    assert all(v <= TOL for v in diffs.values()), diffs


def test_itm_negative_sampling_follows_the_official_rng_order():
    from modeling_xvlm.losses import sample_hard_negatives

    g = torch.Generator().manual_seed(0)
    image_feat = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text_feat = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    temp = torch.tensor(0.07)
    torch.manual_seed(1)
    neg_images, neg_texts = ref.itm_negatives(image_feat, text_feat, temp)
    torch.manual_seed(1)
    model_images, model_texts, _, _ = sample_hard_negatives(image_feat @ text_feat.t() / temp)
    assert model_images.tolist() == neg_images and model_texts.tolist() == neg_texts


def test_module_entry_point_help():
    import subprocess

    run = subprocess.run(
        [sys.executable, "-m", "modeling_xvlm.conversion", "--help"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0
    for option in ("--checkpoint", "--task", "--output", "--image-size", "--config", "--tokenizer", "--push-to-hub"):
        assert option in run.stdout
