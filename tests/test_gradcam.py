"""Weakly supervised grounding (official `Grounding.py` on the retrieval model): `XVLMForRetrieval.compute_gradcam`
and `XVLMProcessor.post_process_gradcam` against an independent re-implementation of the official computation
(`official_reference.gradcam_official`: a hand-written eager forward on an official-format state dict that keeps
the gradient of the saved cross-attention probabilities; `grounding_choose_official`: the `grounding_eval` loop)."""

from __future__ import annotations

import io
import json
import os
import pickle
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

import official_reference as ref  # noqa: E402
from modeling_xvlm.conversion import (  # noqa: E402
    build_config,
    convert_state_dict,
    head_class,
    load_into_model,
)
from modeling_xvlm.conversion.official_config import OfficialConfig  # noqa: E402
from official_format import official_state_dict, tiny_arch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
# 3 fusion layers (2, 3, 4) so that the layer argument picks between several.
ARCH = tiny_arch(layers=5, fusion=2)


@pytest.fixture(scope="module")
def official():
    """An official-format retrieval state dict, the converted `XVLMForRetrieval` (eval mode) and a padded batch."""
    sd = official_state_dict(ARCH, "retrieval", seed=21)
    config, _ = build_config(sd, OfficialConfig(text={"num_attention_heads": ARCH.text_heads}))
    result = convert_state_dict(sd, "retrieval")
    model = head_class("retrieval")(config)
    load_into_model(result, model)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, ARCH.image_res, ARCH.image_res, generator=g)
    ids = torch.randint(5, ARCH.vocab, (3, 7), generator=g)
    ids[:, 0] = 2
    atts = torch.ones(3, 7, dtype=torch.long)
    atts[1, 4:] = 0
    atts[2, 6:] = 0
    ids[atts == 0] = 0
    return sd, model.eval(), images, ids, atts


def _reference_maps(sd, images, ids, atts, block_num):
    spec = ref.TextSpec(ARCH.text_heads, ARCH.fusion, ARCH.layers)
    with torch.no_grad():
        image = ref.image_sequence(ref.swin_patch_tokens(sd, images, ARCH.image_res, ARCH.window))
    grid = ARCH.image_res // (ARCH.patch * 2 ** (len(ARCH.depths) - 1))
    return ref.gradcam_official(sd, image, ids, atts, spec, block_num, grid)


@pytest.mark.parametrize("layer", [None, 2, 3, 4])
def test_gradcam_matches_the_official_computation(official, layer):
    sd, model, images, ids, atts = official
    assert model.config.default_gradcam_layer == 4  # fusion_layer + 3 capped at the last layer
    expected = _reference_maps(sd, images, ids, atts, 4 if layer is None else layer)
    maps = model.compute_gradcam(images, ids, atts, layer=layer)
    grid = model.config.image_size // model.config.patch_stride
    assert maps.shape == (3, grid, grid) and maps.dtype == torch.float32
    assert expected.abs().max() > 0  # a non-trivial map
    torch.testing.assert_close(maps, expected, rtol=0, atol=TOL)


def test_official_mean_counts_padded_positions_and_the_switch_does_not(official):
    """Official: a pair's map is the sum over its real tokens / the padded batch length; `real_tokens_only` divides
    by its own length, so the map no longer depends on the other texts of the batch."""
    sd, model, images, ids, atts = official
    official_maps = model.compute_gradcam(images, ids, atts)
    real = model.compute_gradcam(images, ids, atts, real_tokens_only=True)
    lengths = atts.sum(1).to(torch.float32)
    torch.testing.assert_close(real, official_maps * (atts.shape[1] / lengths)[:, None, None], rtol=1e-5, atol=1e-7)
    # Pair 1 alone, unpadded (4 real tokens): the switch gives the same map as in the padded batch; the official
    # mean gives that map scaled by 4 / 7.
    alone = model.compute_gradcam(images[1:2], ids[1:2, :4], atts[1:2, :4])
    torch.testing.assert_close(real[1:2], alone, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(official_maps[1:2], alone * 4 / 7, rtol=1e-5, atol=1e-7)
    expected_alone = _reference_maps(sd, images[1:2], ids[1:2, :4], atts[1:2, :4], 4)
    torch.testing.assert_close(alone, expected_alone, rtol=0, atol=TOL)


def test_gradcam_leaves_grads_alone_and_works_under_no_grad(official):
    _, model, images, ids, atts = official
    expected = model.compute_gradcam(images, ids, atts)
    params = list(model.parameters())
    assert all(p.grad is None for p in params)
    marker = torch.full_like(params[0], 0.5)
    params[0].grad = marker.clone()
    with torch.no_grad():
        maps = model.compute_gradcam(images, ids, atts)
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)
    assert not maps.requires_grad
    assert torch.equal(params[0].grad, marker)
    assert all(p.grad is None for p in params[1:])
    params[0].grad = None


def test_gradcam_default_mask_is_all_ones(official):
    _, model, images, ids, _ = official
    full = torch.ones_like(ids)
    torch.testing.assert_close(model.compute_gradcam(images, ids), model.compute_gradcam(images, ids, full))


@pytest.mark.parametrize("layer", [0, 1, 5, -1])
def test_gradcam_rejects_a_layer_that_is_not_a_fusion_layer(official, layer):
    _, model, images, ids, atts = official
    with pytest.raises(ValueError, match=r"layer must be a fusion layer, in \[2, 5\)"):
        model.compute_gradcam(images, ids, atts, layer=layer)


@pytest.mark.parametrize("layer", [2.5, "3", True])
def test_gradcam_rejects_a_layer_that_is_not_an_int(official, layer):
    _, model, images, ids, atts = official
    with pytest.raises(TypeError, match="layer must be an int"):
        model.compute_gradcam(images, ids, atts, layer=layer)


def test_gradcam_rejects_mismatched_pairs(official):
    _, model, images, ids, atts = official
    with pytest.raises(ValueError, match="pairs image b with text b: got 2 images and 3 texts"):
        model.compute_gradcam(images[:2], ids, atts)


# ----------------------------------------------------------------------------------------------------------------
# post_process_gradcam (official grounding_eval box ranking)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def processor(tiny_tokenizer):
    from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

    return XVLMProcessor(image_processor=XVLMImageProcessorPil(), tokenizer=tiny_tokenizer)


# Fractional coordinates (the int() truncations matter), a box crossing the right/bottom border (full area kept),
# overlapping boxes of different sizes.
DETS = [
    [[3.7, 2.2, 20.5, 11.9], [30.0, 10.4, 40.6, 33.3], [0.0, 0.0, 64.0, 48.0], [50.2, 30.9, 30.0, 30.0]],
    [[10.5, 5.5, 5.2, 7.7], [1.0, 1.0, 30.0, 20.0]],
    [[12.0, 40.1, 8.0, 8.0], [0.9, 0.9, 10.0, 50.0], [20.0, 20.0, 15.0, 15.0]],
]
SIZES = [(48, 64), (37, 29), (60, 41)]


def _check_against_official(results, maps):
    for cam, dets, (height, width), got in zip(maps, DETS, SIZES, results):
        box, scores = ref.grounding_choose_official(cam, dets, height, width)
        assert box is not None  # every case here has a positive best score (the official loop needs one)
        torch.testing.assert_close(got["scores"], scores, rtol=0, atol=TOL)
        assert got["index"] == dets.index(box)
        x, y, w, h = box
        torch.testing.assert_close(got["box"], torch.tensor([x, y, x + w, y + h]))


def test_post_process_gradcam_matches_the_official_ranking_on_model_maps(official, processor):
    _, model, images, ids, atts = official
    maps = model.compute_gradcam(images, ids, atts)
    results = processor.post_process_gradcam(maps, DETS, SIZES)
    assert [sorted(r) for r in results] == [["box", "index", "scores"]] * 3
    assert [r["scores"].shape for r in results] == [(4,), (2,), (3,)]
    _check_against_official(results, maps)


def test_post_process_gradcam_with_negative_lobes_and_tensor_inputs(processor):
    """A map with a sharp peak: the bicubic up-sampling dips below 0 around it, as officially; boxes and sizes as
    tensors, maps as a list."""
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = maps[1, 2, 0] = maps[2, 3, 2] = 1.0
    maps[2, 0, 0] = 0.3
    up = torch.nn.functional.interpolate(maps[:1, None], size=SIZES[0], mode="bicubic")
    assert up.min() < 0
    results = processor.post_process_gradcam(
        list(maps), [torch.tensor(d) for d in DETS], torch.tensor(SIZES)
    )
    _check_against_official(results, maps)


def test_post_process_gradcam_ties_go_to_the_first_box(processor):
    maps = torch.ones(1, 4, 4)
    result = processor.post_process_gradcam(maps, [[[0, 0, 8, 8], [8, 8, 8, 8], [0, 0, 4, 4]]], [(16, 16)])[0]
    torch.testing.assert_close(result["scores"], torch.tensor([8.0, 8.0, 4.0]))
    assert result["index"] == 0


@pytest.mark.parametrize(
    "maps,boxes,sizes,message",
    [
        (torch.ones(4, 4), [[[0, 0, 2, 2]]], [(8, 8)], r"maps must be \(batch, grid_h, grid_w\)"),
        (torch.ones(1, 4, 4), [[[0, 0, 2, 2]]], [(8, 8), (8, 8)], "one \\(height, width\\) per map \\(1\\)"),
        (torch.ones(1, 4, 4), [[[0, 0, 2, 2]]], [(8, 0)], "positive whole pixels"),
        (torch.ones(1, 4, 4), [[[0, 0, 2, 2]]], [(8.5, 8)], "positive whole pixels"),
        (torch.ones(1, 4, 4), [[[0, 0, 2, 2]]], [8], "must be \\(height, width\\)"),
        (torch.ones(2, 4, 4), [[[0, 0, 2, 2]]], [(8, 8)] * 2, "one list of boxes per map \\(2\\)"),
        (torch.ones(1, 4, 4), [[]], [(8, 8)], r"candidate_boxes\[0\] must be a non-empty list"),
        (torch.ones(1, 4, 4), [[[0, 0, 2]]], [(8, 8)], r"candidate_boxes\[0\]\[0\] must be \[x, y, w, h\]"),
        (torch.ones(1, 4, 4), [[[0, 0, 2, 2], [1, -1, 2, 2]]], [(8, 8)], r"\[0\]\[1\] .* negative coordinate"),
        (torch.ones(1, 4, 4), [[[0, 0, 0, 2]]], [(8, 8)], "non-positive size"),
        (torch.ones(1, 4, 4), [[[0, 0, float("nan"), 2]]], [(8, 8)], "four finite numbers"),
        (torch.full((1, 4, 4), float("nan")), [[[0, 0, 2, 2]]], [(8, 8)], "non-finite box scores"),
    ],
)
def test_post_process_gradcam_rejects_bad_input(processor, maps, boxes, sizes, message):
    with pytest.raises(ValueError, match=message):
        processor.post_process_gradcam(maps, boxes, sizes)


# ----------------------------------------------------------------------------------------------------------------
# End to end: official files (with dets.json) -> xvlm-data convert-official -> xvlm-eval grounding --method gradcam
# ----------------------------------------------------------------------------------------------------------------


def _png(seed, width, height):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def refcoco_weak(tmp_path, official, tiny_tokenizer):
    """Official RefCOCO+ files with dets.json, converted; and the tiny official retrieval model saved with a
    processor."""
    from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

    from modeling_xvlm.data.cli import main as xvlm_data

    root, ann = tmp_path / "images", tmp_path / "ann"
    (root / "coco").mkdir(parents=True)
    ann.mkdir()
    sizes = {1: (64, 48), 2: (50, 40), 3: (30, 60)}  # image id -> (width, height)
    for image_id, (width, height) in sizes.items():
        (root / "coco" / f"COCO_val2014_{image_id:012d}.png").write_bytes(_png(image_id, width, height))
    texts = ["left red circle", "the big square", "a small dog", "the man on the right", "blue shape", "the cat"]
    refs, records, annotations = [], [], []
    gt = {10: [2, 3, 20, 30], 11: [30.5, 10, 30, 30], 12: [5, 5, 10, 10], 13: [25, 15, 20, 20], 14: [0, 0, 28, 20],
          15: [3, 30, 20, 25]}
    images = {10: 1, 11: 1, 12: 2, 13: 2, 14: 3, 15: 3}
    splits = {10: "val", 11: "testA", 12: "testA", 13: "testB", 14: "val", 15: "testB"}
    for k, ref_id in enumerate(gt):
        image_id = images[ref_id]
        records.append({"image": f"coco/COCO_val2014_{image_id:012d}.png", "text": texts[k], "ref_id": ref_id})
        refs.append({"ref_id": ref_id, "ann_id": 100 + ref_id, "image_id": image_id, "split": splits[ref_id]})
        annotations.append({"id": 100 + ref_id, "bbox": gt[ref_id]})
    dets = {
        "1": [[2.4, 3.1, 20.0, 29.5, 0.9], [30.2, 10.0, 30.0, 30.0, 0.8], [0, 0, 64, 48, 0.5], [10, 10, 0, 5, 0.1]],
        "2": [[5.5, 5.5, 10.0, 10.0, 0.7], [25.0, 15.0, 20.0, 20.0, 0.6], [1.0, 1.0, 48.0, 38.0, 0.3]],
        "3": [[0.0, 0.0, 28.0, 20.0, 0.9], [3.0, 30.0, 20.0, 25.0, 0.9], [-1.0, 5.0, 10.0, 10.0, 0.2],
              [10.0, 10.0, 25.0, 55.0, 0.4]],
    }
    (ann / "refcoco+_test.json").write_text(json.dumps(records))
    # A train split whose image has no detections: its rows get [] (counted).
    (ann / "refcoco+_train.json").write_text(json.dumps([{"image": "coco/COCO_val2014_000000000001.png",
                                                          "text": "no detections", "ref_id": 20}]))
    refs.append({"ref_id": 20, "ann_id": 120, "image_id": 7, "split": "train"})
    annotations.append({"id": 120, "bbox": [1, 1, 5, 5]})
    (ann / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (ann / "instances.json").write_text(json.dumps({"annotations": annotations}))
    (ann / "dets.json").write_text(json.dumps(dets))
    data = tmp_path / "data"
    assert xvlm_data([
        "convert-official", "--out", str(data), "--image-root", str(root), "--no-progress",
        "--grounding-test", str(ann / "refcoco+_test.json"), "--grounding-train", str(ann / "refcoco+_train.json"),
        "--refcoco-refs", str(ann / "refs(unc).p"), "--refcoco-instances", str(ann / "instances.json"),
        "--refcoco-dets", str(ann / "dets.json"),
    ]) == 0

    sd, model, *_ = official
    processor = XVLMProcessor(
        image_processor=XVLMImageProcessorPil(size={"height": ARCH.image_res, "width": ARCH.image_res},
                                              patch_size=model.config.patch_stride),
        tokenizer=tiny_tokenizer,
    )
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return {"data": data, "model": tmp_path / "model", "sd": sd, "processor": processor, "dets": dets, "gt": gt,
            "summary": json.loads((data / "conversion_summary.json").read_text())}


def test_convert_official_dets_become_candidate_boxes(refcoco_weak, tmp_path):
    from modeling_xvlm.data import load_xvlm_dataset
    from modeling_xvlm.data.schemas import feature_mismatches

    test = load_xvlm_dataset(str(refcoco_weak["data"]), "grounding", "test", cache_dir=str(tmp_path / "hf"))
    assert feature_mismatches(test.features, "grounding") == []
    dets = refcoco_weak["dets"]
    kept = {  # the first four numbers; the zero-width and the negative-x detections are dropped
        "1": [d[:4] for d in dets["1"][:3]], "2": [d[:4] for d in dets["2"]],
        "3": [d[:4] for k, d in enumerate(dets["3"]) if k != 2],
    }
    assert [r["candidate_boxes"] for r in test] == [kept[str(i)] for i in (1, 1, 2, 2, 3, 3)]
    train = load_xvlm_dataset(str(refcoco_weak["data"]), "grounding", "train", cache_dir=str(tmp_path / "hf"))
    assert [r["candidate_boxes"] for r in train] == [[]]
    summary = refcoco_weak["summary"]
    # counted per row: two rows of each image
    assert (summary["candidate_boxes_dropped"], summary["images_without_dets"]) == (4, 1)


def test_xvlm_eval_grounding_gradcam_equals_the_official_evaluation(refcoco_weak, tmp_path, capsys):
    from modeling_xvlm.data import load_xvlm_dataset
    from modeling_xvlm.training import evaluate as ev

    out = tmp_path / "metrics.json"
    assert ev.main(["grounding", "--method", "gradcam", "--model", str(refcoco_weak["model"]), "--dataset",
                    str(refcoco_weak["data"]), "--split", "test", "--device", "cpu", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert "random-candidate chance" in capsys.readouterr().out

    # The official evaluation, independently: one batch of 6 (< 20) padded to the longest text, the reference
    # Grad-CAM, `grounding_eval`'s ranking and `computeIoU`.
    rows = list(load_xvlm_dataset(str(refcoco_weak["data"]), "grounding", "test", cache_dir=str(tmp_path / "hf")))
    inputs = refcoco_weak["processor"](images=[r["image"] for r in rows], text=[r["text"] for r in rows])
    maps = _reference_maps(refcoco_weak["sd"], inputs["pixel_values"], inputs["input_ids"],
                           inputs["attention_mask"], 4)
    correct: dict[str, list[bool]] = {}
    chosen = []
    for row, cam in zip(rows, maps):
        box, _ = ref.grounding_choose_official(cam, row["candidate_boxes"], row["height"], row["width"])
        chosen.append(box)
        correct.setdefault(row["group"], []).append(ref.compute_iou_official(row["bbox"], box) >= 0.5)
    everything = [c for group in correct.values() for c in group]
    assert metrics["acc@0.5"] == pytest.approx(100 * sum(everything) / len(everything))
    assert metrics["groups"] == {
        g: {"acc@0.5": pytest.approx(100 * sum(c) / len(c)), "num_examples": len(c)} for g, c in correct.items()
    }
    assert metrics["method"] == "gradcam" and metrics["num_examples"] == 6
    chance = [sum(ref.compute_iou_official(r["bbox"], b) >= 0.5 for b in r["candidate_boxes"])
              / len(r["candidate_boxes"]) for r in rows]
    assert metrics["chance"] == pytest.approx(100 * sum(chance) / len(chance))
    # The same boxes through the API, with the predictions.
    from modeling_xvlm import XVLMForRetrieval

    model = XVLMForRetrieval.from_pretrained(refcoco_weak["model"])
    result = ev.evaluate_grounding(model, refcoco_weak["processor"], rows, method="gradcam", return_predictions=True)
    assert result["predictions"] == chosen


def test_evaluate_grounding_gradcam_refuses_what_it_cannot_rank(refcoco_weak, tmp_path, capsys):
    from modeling_xvlm import XVLMConfig, XVLMForGrounding
    from modeling_xvlm.data import load_xvlm_dataset
    from modeling_xvlm.training import evaluate as ev

    rows = list(load_xvlm_dataset(str(refcoco_weak["data"]), "grounding", "train", cache_dir=str(tmp_path / "hf")))
    from modeling_xvlm import XVLMForRetrieval

    model = XVLMForRetrieval.from_pretrained(refcoco_weak["model"])
    with pytest.raises(ValueError, match=r"grounding row 0 \(ref_id 20\) has no candidate_boxes"):
        ev.evaluate_grounding(model, refcoco_weak["processor"], rows, method="gradcam")
    with pytest.raises(ValueError, match="method 'gradcam' needs a retrieval model .* got XVLMForGrounding"):
        ev.evaluate_grounding(XVLMForGrounding(XVLMConfig.from_preset("tiny")), refcoco_weak["processor"], rows,
                              method="gradcam")
    with pytest.raises(ValueError, match="method must be one of"):
        ev.evaluate_grounding(model, refcoco_weak["processor"], rows, method="itc")
    assert ev.main(["retrieval", "--method", "gradcam", "--model", str(refcoco_weak["model"])]) == 2
    assert "--method gradcam is for the grounding task only" in capsys.readouterr().err
    XVLMForGrounding(XVLMConfig.from_preset("tiny")).save_pretrained(tmp_path / "box")
    refcoco_weak["processor"].save_pretrained(tmp_path / "box")
    assert ev.main(["grounding", "--method", "gradcam", "--model", str(tmp_path / "box"), "--dataset",
                    str(refcoco_weak["data"]), "--device", "cpu"]) == 2
    assert "--method gradcam needs a retrieval checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The visual-grounding pipeline with method="gradcam"
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def weak_grounder(official, tiny_tokenizer):
    from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor
    from transformers import pipeline

    import modeling_xvlm  # noqa: F401  (registers "visual-grounding")

    sd, model, *_ = official
    processor = XVLMProcessor(
        image_processor=XVLMImageProcessorPil(size={"height": ARCH.image_res, "width": ARCH.image_res},
                                              patch_size=model.config.patch_stride),
        tokenizer=tiny_tokenizer,
    )
    return pipeline("visual-grounding", model=model, processor=processor), processor, sd


def test_pipeline_gradcam_equals_the_official_choice(weak_grounder):
    grounder, processor, sd = weak_grounder
    images = [Image.open(io.BytesIO(_png(s, w, h))) for s, (h, w) in enumerate(SIZES)]
    texts = ["the red circle on the left", "a dog", "the big square"]
    results = grounder([{"image": i, "text": t, "candidate_boxes": d} for i, t, d in zip(images, texts, DETS)])
    inputs = processor(images=images, text=texts)
    for k, (image, text, dets, result) in enumerate(zip(images, texts, DETS, results)):
        # batch_size 1: each text alone, unpadded
        length = int(inputs["attention_mask"][k].sum())
        cam = _reference_maps(sd, inputs["pixel_values"][k:k + 1], inputs["input_ids"][k:k + 1, :length],
                              inputs["attention_mask"][k:k + 1, :length], 4)[0]
        box, scores = ref.grounding_choose_official(cam, dets, image.height, image.width)
        assert result["index"] == dets.index(box) and result["text"] == text
        assert result["scores"] == pytest.approx(scores.tolist(), abs=TOL)
        x, y, w, h = box
        assert result["box_xyxy"] == pytest.approx([x, y, x + w, y + h])
        assert result["box"] == dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(v) for v in (x, y, x + w, y + h))))
        torch.testing.assert_close(result["gradcam"], cam, rtol=0, atol=TOL)
    # One candidate list for every pair of a call; a batch pads the texts (the official scaling of the maps).
    shared = grounder(images[0], texts, candidate_boxes=DETS[0], batch_size=3)
    assert [r["text"] for r in shared] == texts and all(len(r["scores"]) == 4 for r in shared)
    padded = processor(images=[images[0]] * 3, text=texts)
    maps = _reference_maps(sd, padded["pixel_values"], padded["input_ids"], padded["attention_mask"], 4)
    for cam, result in zip(maps, shared):
        torch.testing.assert_close(result["gradcam"], cam, rtol=0, atol=TOL)


def test_pipeline_gradcam_preview_draws_the_map_and_the_box(weak_grounder):
    from modeling_xvlm.pipelines import draw_heatmap, heatmap_colors

    grounder, _, _ = weak_grounder
    image = Image.open(io.BytesIO(_png(0, 64, 48)))
    result = grounder(image, "the red circle", candidate_boxes=[DETS[0][k] for k in (0, 1, 3)])  # none covers all
    preview = result["preview"]
    assert preview.size == image.size and preview is not image
    heat = draw_heatmap(image, result["gradcam"])
    assert not np.array_equal(np.asarray(heat), np.asarray(image.convert("RGB")))
    x0, y0, x1, y1 = result["box"].values()
    row = (y0 + y1) // 2
    assert (255, 0, 0) in [preview.getpixel((x, row)) for x in range(max(0, x0 - 1), x0 + 3)]  # left edge drawn
    # Far from the box the preview is the heat map blend (half image, half colour scale).
    away = [(x, y) for x in range(64) for y in range(48) if not (x0 - 4 <= x <= x1 + 4 and y0 - 16 <= y <= y1 + 4)]
    assert away and all(preview.getpixel(p) == heat.getpixel(p) for p in away)
    assert heatmap_colors(np.array([0.0, 0.5, 1.0])).tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]
    assert "preview" not in grounder(image, "a dog", candidate_boxes=DETS[0], preview=False)


def test_pipeline_gradcam_errors(weak_grounder, tiny_tokenizer):
    from transformers import pipeline

    from modeling_xvlm import XVLMConfig, XVLMForGrounding

    grounder, processor, _ = weak_grounder
    image = Image.new("RGB", (32, 24))
    with pytest.raises(ValueError, match="method='gradcam' ranks candidate boxes: pass candidate_boxes"):
        grounder(image, "a dog")
    with pytest.raises(ValueError, match=r"candidate_boxes\[0\]\[0\] .* non-positive size"):
        grounder(image, "a dog", candidate_boxes=[[0, 0, 0, 5]])
    with pytest.raises(ValueError, match="method='box' needs a grounding model .* got XVLMForRetrieval"):
        grounder(image, "a dog", method="box")
    with pytest.raises(ValueError, match="method must be 'box' or 'gradcam', got 'itc'"):
        grounder(image, "a dog", method="itc")
    box_grounder = pipeline("visual-grounding", model=XVLMForGrounding(XVLMConfig.from_preset("tiny")).eval(),
                            processor=processor)
    with pytest.raises(ValueError, match="method='gradcam' needs a retrieval model .* got XVLMForGrounding"):
        box_grounder(image, "a dog", method="gradcam", candidate_boxes=[[0, 0, 5, 5]])


def test_gradcam_example_writes_a_png(tmp_path, monkeypatch, capsys):
    output = tmp_path / "gradcam.png"
    monkeypatch.setattr(sys, "argv", ["gradcam_grounding.py", "--output", str(output)])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "gradcam_grounding.py"), run_name="__main__")
    preview = Image.open(output)
    assert preview.format == "PNG" and preview.mode == "RGB" and preview.size == (320, 240)
    pixels = np.asarray(preview)
    assert ((pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)).any()  # the drawn box
    printed = capsys.readouterr().out
    assert printed.count("score") == 4 and printed.count("<- chosen") == 1


def test_pipeline_refuses_a_retrieval_checkpoint_loaded_as_a_box_grounder(refcoco_weak):
    """`pipeline("visual-grounding", model=path)` loads `XVLMForGrounding`: a retrieval checkpoint would get a random
    box head, so the pipeline says how to ground with it instead."""
    from transformers import pipeline

    with pytest.raises(ValueError, match=r"retrieval model \(config.architectures \['XVLMForRetrieval'\]\).*"
                                         r"XVLMForRetrieval.from_pretrained"):
        pipeline("visual-grounding", model=str(refcoco_weak["model"]))


# ----------------------------------------------------------------------------------------------------------------
# The optional `candidate_boxes` column of the grounding schema
# ----------------------------------------------------------------------------------------------------------------


def _grounding_record(**extra):
    return {"image": Image.new("RGB", (40, 30)), "image_id": "1", "width": 40, "height": 30, "text": "a dog",
            "bbox": [1.0, 2.0, 10.0, 10.0], "ref_id": 3, "group": "val", **extra}


def test_candidate_boxes_schema_validation_and_writer(tmp_path):
    import datasets

    from modeling_xvlm.data.schemas import (
        DatasetFolderWriter,
        feature_mismatches,
        get_features,
        validate_record,
    )

    assert "candidate_boxes" not in get_features("grounding")
    with_candidates = get_features("grounding", ["candidate_boxes"])
    assert with_candidates["candidate_boxes"].feature.feature.dtype == "float64"
    with pytest.raises(KeyError, match="'objects' is no optional column of 'grounding'"):
        get_features("grounding", ["objects"])
    # Present with another type: reported; absent: fine.
    retyped = dict(with_candidates, candidate_boxes=datasets.List(datasets.Value("string")))
    assert feature_mismatches(retyped, "grounding") == [
        "column 'candidate_boxes' is List(Value('string')), expected List(List(Value('float64'), length=4))"
    ]
    assert feature_mismatches(with_candidates, "grounding") == feature_mismatches(get_features("grounding"),
                                                                                   "grounding") == []
    # Values: a candidate may cross the border, not start below 0 or have no area.
    assert validate_record(_grounding_record(candidate_boxes=[[30.0, 20.0, 50.0, 50.0]]), "grounding") == []
    assert validate_record(_grounding_record(candidate_boxes=[[-1.0, 0.0, 5.0, 5.0], [0.0, 0.0, 0.0, 5.0]]),
                           "grounding") == [
        "candidate_boxes[0] [-1.0, 0.0, 5.0, 5.0] starts at a negative coordinate",
        "candidate_boxes[1] has a non-positive size: [0.0, 0.0, 0.0, 5.0]",
    ]
    # One schema per configuration: its first record decides; a later record without the column gets [].
    with DatasetFolderWriter(tmp_path / "ok") as writer:
        writer.add("grounding", "test", _grounding_record(candidate_boxes=[[0.5, 0.25, 3.0, 4.0]]))
        writer.add("grounding", "test", _grounding_record(candidate_boxes=[]))
        writer.add("grounding", "train", _grounding_record())
    for split, expected in (("test", [[[0.5, 0.25, 3.0, 4.0]], []]), ("train", [[]])):
        rows = datasets.load_dataset(str(tmp_path / "ok"), "grounding", split=split, cache_dir=str(tmp_path / "hf"))
        assert rows["candidate_boxes"] == expected
    writer = DatasetFolderWriter(tmp_path / "late")
    writer.add("grounding", "train", _grounding_record())
    with pytest.raises(ValueError, match=r"optional columns \[\] in the first record but \['candidate_boxes'\]"):
        writer.add("grounding", "test", _grounding_record(candidate_boxes=[[0.0, 0.0, 3.0, 4.0]]))


def test_convert_official_gives_every_grounding_split_the_column_when_one_file_has_dets(tmp_path):
    """VLUE-style records carry their own `dets`; a split without them still gets `candidate_boxes` ([]), so that
    the config loads with one schema."""
    from modeling_xvlm.data import load_xvlm_dataset
    from modeling_xvlm.data.official import convert_official

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png(0, 30, 20))
    plain = [{"image": "a.png", "text": "a dog", "ref_id": 1, "bbox": [1, 1, 5, 5]}]
    vlue = [{"image": "a.png", "text": "a cat", "ref_id": 2, "bbox": [2, 2, 5, 5], "dets": [[0, 0, 9, 9, 0.5]]}]
    (tmp_path / "train.json").write_text(json.dumps(plain))
    (tmp_path / "val.json").write_text(json.dumps(vlue))
    convert_official(tmp_path / "out", tmp_path / "images",
                     grounding={"train": tmp_path / "train.json", "val": tmp_path / "val.json"})
    cache = str(tmp_path / "hf")
    assert load_xvlm_dataset(str(tmp_path / "out"), "grounding", "train", cache_dir=cache)["candidate_boxes"] == [[]]
    assert load_xvlm_dataset(str(tmp_path / "out"), "grounding", "validation", cache_dir=cache)[
        "candidate_boxes"] == [[[0.0, 0.0, 9.0, 9.0]]]
