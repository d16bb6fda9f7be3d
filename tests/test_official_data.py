"""Conversion of the official X-VLM JSON files (small hand-written ones) into the Hub-format layout."""

from __future__ import annotations

import base64
import io
import json
import pickle

import datasets
import numpy as np
import pytest
from PIL import Image

from modeling_xvlm.data.cli import main as xvlm_data
from modeling_xvlm.data.loading import load_xvlm_dataset
from modeling_xvlm.data.official import convert_official


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _image_bytes(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def official(tmp_path):
    """Hand-written official files: every format of §5, one missing image, one corrupt and one truncated image."""
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    files = {
        "coco/1.jpg": _image_bytes(1, (64, 48), "JPEG"),
        "coco/2.png": _image_bytes(2, (50, 40), "PNG"),
        "coco/3.png": _image_bytes(3, (30, 60), "PNG"),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    (root / "coco/corrupt.jpg").write_bytes(b"this is not an image")
    (root / "coco/truncated.png").write_bytes(files["coco/2.png"][:200])
    binary = _image_bytes(4, (20, 20), "PNG")
    ann = tmp_path / "ann"
    (ann / "pretrain_text").mkdir(parents=True)
    lines = [
        {"caption": "a dog on a couch", "image_rpath": "coco/1.jpg"},
        {"caption": ["two cats", "some cats"], "binary": base64.b64encode(binary).decode()},
        {"caption": "lost", "image_rpath": "coco/missing.jpg"},
    ]
    (ann / "pretrain_text" / "part-0.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    corrupt = {"caption": "bad", "image_rpath": "coco/corrupt.jpg"}
    (ann / "pretrain_text" / "part-1.json").write_text(json.dumps(corrupt))
    regions = [
        {"image_rpath": "coco/2.png", "caption": "a kitchen",
         "elems": [{"caption": "cup", "bb": [1, 2, 10, 12], "attributes": ["white", "small"]},
                   {"caption": ["table", "wooden table"], "bb": [40, 30, 20, 20]},  # clipped to 10 x 10
                   {"caption": "nothing", "bb": [60, 0, 5, 5]}]},  # outside: dropped
        {"image_rpath": "coco/3.png", "elems": [{"caption": "person", "bb": [0, 0, 30, 60], "attributes": "tall"}]},
    ]
    (ann / "regions.json").write_text("\n".join(json.dumps(x) for x in regions))
    (ann / "coco_train.json").write_text(json.dumps([
        {"image": "coco/1.jpg", "caption": "first caption", "image_id": 101},
        {"image": "coco/2.png", "caption": "other image", "image_id": 102},
        {"image": "coco/1.jpg", "caption": "second caption", "image_id": 101},
        {"image": "coco/missing.jpg", "caption": "gone", "image_id": 103},
    ]))
    (ann / "coco_test.json").write_text(json.dumps([
        {"image": "coco/3.png", "caption": ["a", "b", "c"]},
        {"image": "coco/truncated.png", "caption": ["d"]},
        {"image": "coco/1.jpg", "caption": ["e", "f"]},
    ]))
    (ann / "refcoco+_train.json").write_text(json.dumps([
        {"image": "coco/1.jpg", "text": "left dog", "ref_id": 5},
        {"image": "coco/1.jpg", "text": "right dog", "ref_id": 6},
        {"image": "coco/2.png", "text": "no box known", "ref_id": 99},
    ]))
    (ann / "refcoco+_test.json").write_text(json.dumps([
        {"image": "coco/2.png", "text": "the cup", "ref_id": 7},
        {"image": "coco/missing.jpg", "text": "ghost", "ref_id": 8},
    ]))
    refs = [{"ref_id": 5, "ann_id": 50, "image_id": 1, "split": "train"},
            {"ref_id": 6, "ann_id": 60, "image_id": 1, "split": "train"},
            {"ref_id": 7, "ann_id": 70, "image_id": 2, "split": "testA"},
            {"ref_id": 8, "ann_id": 80, "image_id": 9, "split": "testB"}]
    (ann / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (ann / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "width": 64, "height": 48}, {"id": 2, "width": 50, "height": 40}],
        "annotations": [{"id": 50, "bbox": [0.5, 1.5, 20.25, 30.0]}, {"id": 60, "bbox": [30, 10, 30, 30]},
                        {"id": 70, "bbox": [5, 5, 10, 10]}, {"id": 80, "bbox": [1, 1, 2, 2]}],
    }))
    return {"root": root, "ann": ann, "files": files, "binary": binary}


def _convert(official, out, **kwargs):
    ann = official["ann"]
    return convert_official(
        out, official["root"],
        pretrain_text=[ann / "pretrain_text"], pretrain_regions=[ann / "regions.json"],
        retrieval={"train": ann / "coco_train.json", "test": ann / "coco_test.json"},
        grounding={"train": ann / "refcoco+_train.json", "test": ann / "refcoco+_test.json"},
        refcoco_refs=ann / "refs(unc).p", refcoco_instances=ann / "instances.json", **kwargs,
    )


def _rows(out, config, split, tmp_path):
    return list(load_xvlm_dataset(out, config, split, cache_dir=str(tmp_path / "hf")))


def test_conversion_rows_equal_the_inputs(official, tmp_path):
    out = tmp_path / "out"
    summary = _convert(official, out)
    files = official["files"]

    def same_image(row, data):
        expected = Image.open(io.BytesIO(data)).convert("RGB")
        return np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(expected))

    pretrain = _rows(out, "pretrain", "train", tmp_path)
    assert [(r["image_id"], r["captions"], r["group"]) for r in pretrain] == [
        ("coco/1.jpg", ["a dog on a couch"], "image_text"),
        ("part-0.json:2", ["two cats", "some cats"], "image_text"),
        ("coco/2.png", ["a kitchen"], "regions"),
        ("coco/3.png", [], "regions"),
    ]
    assert same_image(pretrain[0], files["coco/1.jpg"]) and same_image(pretrain[1], official["binary"])
    assert (pretrain[0]["width"], pretrain[0]["height"]) == (64, 48)
    assert pretrain[0]["objects"] == []
    assert pretrain[2]["objects"] == [
        {"bbox": [1.0, 2.0, 10.0, 12.0], "captions": ["cup"], "attributes": ["white", "small"]},
        {"bbox": [40.0, 30.0, 10.0, 10.0], "captions": ["table", "wooden table"], "attributes": []},
    ]
    assert pretrain[3]["objects"] == [{"bbox": [0.0, 0.0, 30.0, 60.0], "captions": ["person"], "attributes": ["tall"]}]

    retrieval_train = _rows(out, "retrieval", "train", tmp_path)
    assert [(r["image_id"], r["captions"]) for r in retrieval_train] == [
        ("101", ["first caption", "second caption"]), ("102", ["other image"])
    ]
    assert same_image(retrieval_train[1], files["coco/2.png"])
    retrieval_test = _rows(out, "retrieval", "test", tmp_path)
    assert [(r["image_id"], r["captions"]) for r in retrieval_test] == [("coco/3.png", ["a", "b", "c"]),
                                                                       ("coco/1.jpg", ["e", "f"])]

    grounding_train = _rows(out, "grounding", "train", tmp_path)
    assert [(r["text"], r["bbox"], r["ref_id"], r["group"]) for r in grounding_train] == [
        ("left dog", [0.5, 1.5, 20.25, 30.0], 5, "train"), ("right dog", [30.0, 10.0, 30.0, 30.0], 6, "train")
    ]
    grounding_test = _rows(out, "grounding", "test", tmp_path)
    assert [(r["text"], r["bbox"], r["ref_id"], r["group"], r["image_id"]) for r in grounding_test] == [
        ("the cup", [5.0, 5.0, 10.0, 10.0], 7, "testA", "coco/2.png")
    ]
    assert same_image(grounding_test[0], files["coco/2.png"])

    # The summary counts what was skipped and why.
    report = json.loads((out / "conversion_summary.json").read_text())
    assert report["written"] == {"pretrain": {"train": 4}, "retrieval": {"train": 2, "test": 2},
                                 "grounding": {"train": 2, "test": 1}}
    assert report["missing_images"] == 1 and report["missing_image_examples"] == ["coco/missing.jpg"]
    assert report["corrupt_images"] == 2
    assert report["skip_reasons"] == {"missing_image": 3, "corrupt_image": 2, "invalid_record": 1, "no_bbox": 1}
    assert report["skipped"] == {"pretrain": {"train": 3}, "retrieval": {"train": 1, "test": 1},
                                 "grounding": {"train": 1, "test": 1}}
    assert (report["boxes_clipped"], report["boxes_dropped"]) == (1, 1)
    assert summary.num_written == 11 and summary.num_skipped == 7
    assert "missing images: 1; corrupt images: 2" in summary.format()
    assert datasets.get_dataset_config_names(str(out)) == ["pretrain", "retrieval", "grounding"]


def test_grounding_records_with_their_own_boxes_and_no_refs(official, tmp_path):
    ann = official["ann"]
    (ann / "vlue.json").write_text(json.dumps([
        {"image": "coco/3.png", "text": "the person", "ref_id": 1, "bbox": [2, 3, 4, 5], "height": 60, "width": 30},
        {"image": "coco/3.png", "text": "no box", "ref_id": 2},
    ]))
    summary = convert_official(tmp_path / "out", official["root"], grounding={"val": ann / "vlue.json"})
    rows = _rows(tmp_path / "out", "grounding", "validation", tmp_path)
    assert [(r["text"], r["bbox"]) for r in rows] == [("the person", [2.0, 3.0, 4.0, 5.0])]
    assert summary.reasons == {"no_bbox": 1}


def test_cli_convert_official(official, tmp_path, capsys):
    ann, out = official["ann"], tmp_path / "cli"
    status = xvlm_data([
        "convert-official", "--out", str(out), "--image-root", str(official["root"]),
        "--retrieval-train", str(ann / "coco_train.json"), "--retrieval-test", str(ann / "coco_test.json"),
        "--grounding-test", str(ann / "refcoco+_test.json"),
        "--refcoco-refs", str(ann / "refs(unc).p"), "--refcoco-instances", str(ann / "instances.json"),
    ])
    printed = capsys.readouterr().out
    assert status == 0
    assert "retrieval/train: 2 rows written, 1 skipped" in printed
    assert "missing: coco/missing.jpg" in printed
    assert len(_rows(out, "retrieval", "test", tmp_path)) == 2
    # Errors are reported, not raised.
    assert xvlm_data(["convert-official", "--out", str(tmp_path / "x"), "--image-root", "."]) == 2
    assert "nothing to convert" in capsys.readouterr().err
    assert xvlm_data(["convert-official", "--out", str(tmp_path / "y"), "--image-root", ".",
                      "--retrieval-test", str(ann / "nope.json")]) == 2


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refs_pickle_with_code_is_refused_and_not_executed(tmp_path):
    from modeling_xvlm.data.official import load_refcoco_boxes

    marker = tmp_path / "pwned"
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([_Exploit(str(marker))]))
    (tmp_path / "instances.json").write_text('{"annotations": []}')
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_refcoco_boxes(refs, tmp_path / "instances.json")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# NLVR2 (official dataset/nlvr_dataset.py: {"images": [left, right], "sentence", "label": "True"|"False"})
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def nlvr2_official(tmp_path):
    root = tmp_path / "nlvr2_images"
    (root / "train").mkdir(parents=True)
    (root / "dev").mkdir()
    files = {f"train/{k}.png": _image_bytes(10 + k, (40 + k, 30), "PNG") for k in range(4)}
    files["dev/a.jpg"] = _image_bytes(20, (32, 32), "JPEG")
    files["dev/b.png"] = _image_bytes(21, (36, 28), "PNG")
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    (root / "dev/broken.png").write_bytes(b"not a png")
    ann = tmp_path / "nlvr_ann"
    ann.mkdir()
    train = [
        {"images": ["train/0.png", "train/1.png"], "sentence": "The left image has two dogs.", "label": "True"},
        {"images": ["train/2.png", "train/3.png"], "sentence": "There are no cats.", "label": "False",
         "identifier": "train-10-1-0"},
        {"images": ["train/0.png", "train/missing.png"], "sentence": "lost", "label": "True"},
        {"images": ["train/1.png"], "sentence": "one image only", "label": "True"},
        {"images": ["train/1.png", "train/2.png"], "sentence": "bad label", "label": "maybe"},
        {"images": ["train/3.png", "train/0.png"], "sentence": "", "label": "False"},
    ]
    dev = [
        {"images": ["dev/a.jpg", "dev/b.png"], "sentence": "both images show a car", "label": "False"},
        {"images": ["dev/broken.png", "dev/b.png"], "sentence": "corrupt left", "label": "True"},
    ]
    test = [{"images": ["dev/b.png", "dev/a.jpg"], "sentence": "a car", "label": "True"}]
    for name, records in (("nlvr_train.json", train), ("nlvr_dev.json", dev), ("nlvr_test.json", test)):
        (ann / name).write_text(json.dumps(records))
    return {"root": root, "ann": ann, "files": files}


def test_nlvr2_conversion_round_trip(nlvr2_official, tmp_path):
    ann, files, out = nlvr2_official["ann"], nlvr2_official["files"], tmp_path / "nlvr2"
    summary = convert_official(
        out, tmp_path / "elsewhere", image_roots={"nlvr2": nlvr2_official["root"]},
        nlvr2={"train": ann / "nlvr_train.json", "dev": ann / "nlvr_dev.json", "test": ann / "nlvr_test.json"},
    )
    assert summary.written == {"nlvr2": {"train": 2, "validation": 1, "test": 1}}
    assert summary.skipped == {"nlvr2": {"train": 4, "validation": 1}}
    assert summary.reasons == {"missing_image": 1, "invalid_record": 3, "corrupt_image": 1}
    assert summary.missing_images == ["train/missing.png"]
    assert summary.corrupt_images[0].startswith("dev/broken.png")
    train = _rows(out, "nlvr2", "train", tmp_path)
    assert [r["identifier"] for r in train] == ["nlvr_train-0", "train-10-1-0"]  # derived, else the record's
    assert [r["sentence"] for r in train] == ["The left image has two dogs.", "There are no cats."]  # raw text
    assert [r["label"] for r in train] == [1, 0]
    for row, (left, right) in zip(train, [("train/0.png", "train/1.png"), ("train/2.png", "train/3.png")]):
        for column, rel in (("left_image", left), ("right_image", right)):
            expected = Image.open(io.BytesIO(files[rel]))
            assert np.array_equal(np.asarray(row[column]), np.asarray(expected.convert("RGB")))
    raw = load_xvlm_dataset(out, "nlvr2", "validation", cache_dir=str(tmp_path / "hf")).cast_column(
        "left_image", datasets.Image(decode=False))
    assert raw[0]["left_image"]["bytes"] == files["dev/a.jpg"]  # original bytes, JPEG stays JPEG
    assert raw[0]["left_image"]["path"] == "dev/a.jpg"
    assert _rows(out, "nlvr2", "test", tmp_path)[0]["label"] == 1
    written = json.loads((out / "conversion_summary.json").read_text())
    assert written["written"]["nlvr2"]["validation"] == 1 and written["num_skipped"] == 5
    assert datasets.get_dataset_config_names(str(out)) == ["nlvr2"]


def test_cli_convert_official_nlvr2(nlvr2_official, tmp_path, capsys):
    ann, out = nlvr2_official["ann"], tmp_path / "cli-nlvr2"
    status = xvlm_data([
        "convert-official", "--out", str(out), "--image-root", str(nlvr2_official["root"]),
        "--nlvr2-train", str(ann / "nlvr_train.json"), "--nlvr2-validation", str(ann / "nlvr_dev.json"),
        "--nlvr2-test", str(ann / "nlvr_test.json"),
    ])
    printed = capsys.readouterr().out
    assert status == 0
    assert "nlvr2/train: 2 rows written, 4 skipped" in printed
    assert "nlvr2/validation: 1 rows written, 1 skipped" in printed
    assert len(_rows(out, "nlvr2", "validation", tmp_path)) == 1
    # --nlvr2-image-root overrides --image-root
    status = xvlm_data([
        "convert-official", "--out", str(tmp_path / "cli2"), "--image-root", str(tmp_path),
        "--nlvr2-image-root", str(nlvr2_official["root"]), "--nlvr2-test", str(ann / "nlvr_test.json"),
    ])
    assert status == 0 and "nlvr2/test: 1 rows written, 0 skipped" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# VQA (official dataset/vqa_dataset.py: {"image", "question", "answer": [str] | str, "dataset"?}, answer_list.json)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def vqa_official(tmp_path):
    """vqa_train.json + vg_qa.json (train), vqa_val.json, vqa_test.json, answer_list.json and three image roots."""
    coco, vg, gqa = tmp_path / "coco", tmp_path / "visualgenome", tmp_path / "gqa"
    for folder in (coco / "train2014", coco / "test2015", vg, gqa):
        folder.mkdir(parents=True)
    files = {
        coco / "train2014/a.jpg": _image_bytes(30, (48, 40), "JPEG"),
        coco / "train2014/b.png": _image_bytes(31, (36, 30), "PNG"),
        coco / "test2015/c.png": _image_bytes(32, (30, 36), "PNG"),
        vg / "1.jpg": _image_bytes(33, (50, 44), "JPEG"),
        gqa / "n1.png": _image_bytes(34, (28, 28), "PNG"),
    }
    for path, data in files.items():
        path.write_bytes(data)
    ten = ["brown"] * 6 + ["tan", "light brown", "brown", "tan"]
    ann = tmp_path / "vqa_ann"
    ann.mkdir()
    vqa_train = [
        {"question_id": 1001, "image": "train2014/a.jpg", "question": "What color is the dog?", "answer": ten,
         "dataset": "vqa"},
        {"question_id": 1002, "image": "train2014/b.png", "question": "Is it on the left?", "answer": ["yes"] * 10},
        {"question_id": 1003, "image": "train2014/missing.jpg", "question": "Lost?", "answer": ["no"] * 10,
         "dataset": "vqa"},
        {"question_id": 1004, "image": "train2014/a.jpg", "question": "", "answer": ["x"], "dataset": "vqa"},
        {"question_id": 1005, "image": "train2014/a.jpg", "question": "Where?", "answer": ["x"], "dataset": "coco"},
        {"question_id": 1006, "image": "train2014/a.jpg", "question": "No answers?", "dataset": "vqa"},
    ]
    vg_qa = [
        {"dataset": "vg", "image": "1.jpg", "question": "What is on the table?", "answer": "a cup"},
        {"dataset": "gqa", "image": str(gqa / "n1.png"), "question": "Is the sky blue?", "answer": ["yes"]},
    ]
    vqa_val = [{"question_id": 2001, "image": "train2014/b.png", "question": "How many?", "answer": ["2"] * 10}]
    vqa_test = [
        {"question_id": 3001, "image": "test2015/c.png", "question": "What is this?"},
        {"question_id": "not a number", "image": "test2015/c.png", "question": "Broken id?"},
    ]
    answer_list = ["brown", "a cup", "yes", 3, "no", "2"]
    for name, records in (("vqa_train.json", vqa_train), ("vg_qa.json", vg_qa), ("vqa_val.json", vqa_val),
                          ("vqa_test.json", vqa_test), ("answer_list.json", answer_list)):
        (ann / name).write_text(json.dumps(records))
    return {"coco": coco, "vg": vg, "ann": ann, "files": files, "ten": ten}


def test_vqa_conversion_round_trip(vqa_official, tmp_path):
    ann, files, out = vqa_official["ann"], vqa_official["files"], tmp_path / "vqa"
    summary = convert_official(
        out, tmp_path / "elsewhere", image_roots={"vqa": vqa_official["coco"]}, vg_image_root=vqa_official["vg"],
        vqa={"train": [ann / "vqa_train.json", ann / "vg_qa.json"], "val": ann / "vqa_val.json",
             "test": ann / "vqa_test.json"},
        vqa_answer_list=ann / "answer_list.json",
        allow_outside_root=True,  # official GQA records give absolute paths
    )
    assert summary.written == {"vqa": {"train": 4, "validation": 1, "test": 1}, "vqa_answers": {"test": 5}}
    assert summary.skipped == {"vqa": {"train": 4, "test": 1}, "vqa_answers": {"test": 1}}
    assert summary.reasons == {"missing_image": 1, "invalid_record": 4, "no_answer": 1}
    assert summary.missing_images == ["train2014/missing.jpg"]
    train = _rows(out, "vqa", "train", tmp_path)
    # Questions and answers as the official files give them; ids of records without one are -(1 + position).
    assert [(r["question_id"], r["question"], r["answers"], r["source"]) for r in train] == [
        (1001, "What color is the dog?", vqa_official["ten"], "vqa"),
        (1002, "Is it on the left?", ["yes"] * 10, ""),
        (-7, "What is on the table?", ["a cup"], "vg"),  # a VG answer string becomes a one-element list
        (-8, "Is the sky blue?", ["yes"], "gqa"),
    ]
    assert [r["image_id"] for r in train] == ["train2014/a.jpg", "train2014/b.png", "1.jpg", "n1.png"]
    assert all(r["group"] == "" for r in train)
    roots = [vqa_official["coco"] / "train2014/a.jpg", vqa_official["coco"] / "train2014/b.png",
             vqa_official["vg"] / "1.jpg", tmp_path / "gqa/n1.png"]
    raw = load_xvlm_dataset(out, "vqa", "train", cache_dir=str(tmp_path / "hf")).cast_column(
        "image", datasets.Image(decode=False))
    assert [r["image"]["bytes"] for r in raw] == [files[p] for p in roots]  # vqa root, vg root, gqa absolute path
    validation = _rows(out, "vqa", "validation", tmp_path)
    assert [(r["question_id"], r["answers"]) for r in validation] == [(2001, ["2"] * 10)]
    test = _rows(out, "vqa", "test", tmp_path)
    assert [(r["question_id"], r["answers"], r["source"]) for r in test] == [(3001, [], "")]
    expected = Image.open(io.BytesIO(files[vqa_official["coco"] / "test2015/c.png"])).convert("RGB")
    assert np.array_equal(np.asarray(test[0]["image"]), np.asarray(expected))
    from modeling_xvlm.data.loading import load_vqa_answer_list

    assert load_vqa_answer_list(out, cache_dir=str(tmp_path / "hf")) == ["brown", "a cup", "yes", "no", "2"]
    report = json.loads((out / "conversion_summary.json").read_text())
    assert report["skip_reasons"]["no_answer"] == 1 and report["num_skipped"] == 6
    assert any("unknown `dataset` 'coco'" in e for e in report["examples"]["invalid_record"])
    assert datasets.get_dataset_config_names(str(out)) == ["vqa", "vqa_answers"]


def test_vqa_vg_records_default_to_the_vqa_root_and_bad_answer_lists_fail(vqa_official, tmp_path):
    ann = vqa_official["ann"]
    (vqa_official["coco"] / "1.jpg").write_bytes(vqa_official["files"][vqa_official["vg"] / "1.jpg"])
    summary = convert_official(tmp_path / "a", vqa_official["coco"], vqa={"train": ann / "vg_qa.json"},
                               allow_outside_root=True)  # the GQA record's absolute path
    assert summary.written == {"vqa": {"train": 2}} and summary.num_skipped == 0
    (ann / "bad_list.json").write_text(json.dumps({"answers": ["yes"]}))
    with pytest.raises(ValueError, match="expected a JSON list of answer strings"):
        convert_official(tmp_path / "b", ".", vqa_answer_list=ann / "bad_list.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        convert_official(tmp_path / "c", ".", vqa={"test": [ann / "vqa_test.json", ann / "nope.json"]})


def test_cli_convert_official_vqa(vqa_official, tmp_path, capsys):
    ann, out = vqa_official["ann"], tmp_path / "cli-vqa"
    status = xvlm_data([
        "convert-official", "--out", str(out), "--image-root", str(vqa_official["coco"]),
        "--vg-image-root", str(vqa_official["vg"]),
        "--vqa-train", str(ann / "vqa_train.json"), str(ann / "vg_qa.json"), "--vqa-val", str(ann / "vqa_val.json"),
        "--vqa-test", str(ann / "vqa_test.json"), "--vqa-answer-list", str(ann / "answer_list.json"),
    ])
    printed = capsys.readouterr().out
    assert status == 0
    # the GQA record's absolute path leaves --image-root: refused without --allow-outside-image-root
    assert "vqa/train: 3 rows written, 5 skipped" in printed
    assert "outside the image root: " in printed
    assert "vqa/test: 1 rows written, 1 skipped" in printed
    assert "vqa_answers/test: 5 rows written, 1 skipped" in printed
    assert [r["question_id"] for r in _rows(out, "vqa", "validation", tmp_path)] == [2001]
    # --vqa-image-root overrides --image-root; the answer list alone is a conversion too
    status = xvlm_data([
        "convert-official", "--out", str(tmp_path / "cli2"), "--image-root", str(tmp_path),
        "--vqa-image-root", str(vqa_official["coco"]), "--vqa-test", str(ann / "vqa_test.json"),
    ])
    assert status == 0 and "vqa/test: 1 rows written, 1 skipped" in capsys.readouterr().out
    assert xvlm_data(["convert-official", "--out", str(tmp_path / "cli3"), "--image-root", ".",
                      "--vqa-answer-list", str(ann / "answer_list.json")]) == 0
    assert "vqa_answers/test: 5 rows written" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# COCO Karpathy captioning (official dataset/coco_karpathy_dataset.py): retrieval rows
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def karpathy_official(tmp_path):
    """coco_karpathy_{train,val,test}.json, coco_karpathy_test_gt.json and a COCO image root."""
    root = tmp_path / "coco"
    for folder in ("train2014", "val2014"):
        (root / folder).mkdir(parents=True)
    files = {
        "train2014/COCO_train2014_000000000010.jpg": _image_bytes(40, (40, 32), "JPEG"),
        "train2014/COCO_train2014_000000000011.jpg": _image_bytes(41, (32, 40), "JPEG"),
        "val2014/COCO_val2014_000000000001.jpg": _image_bytes(42, (36, 36), "JPEG"),
        "val2014/odd_name.jpg": _image_bytes(43, (20, 30), "JPEG"),
        "val2014/COCO_val2014_000000391895.jpg": _image_bytes(44, (44, 30), "JPEG"),
        "val2014/COCO_val2014_000000000003.jpg": _image_bytes(45, (30, 30), "JPEG"),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    ann = tmp_path / "karpathy"
    ann.mkdir()
    train = [
        {"image": "train2014/COCO_train2014_000000000010.jpg", "caption": "A cat on a mat.", "image_id": "coco_10"},
        {"image": "train2014/COCO_train2014_000000000011.jpg", "caption": "A dog.", "image_id": "coco_11"},
        {"image": "train2014/COCO_train2014_000000000010.jpg", "caption": "A sleeping cat.", "image_id": "coco_10"},
        {"image": "train2014/COCO_train2014_000000000012.jpg", "caption": "Gone.", "image_id": "coco_12"},
        {"image": "train2014/COCO_train2014_000000000011.jpg", "caption": "", "image_id": "coco_11"},
    ]
    val = [
        {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["A bus.", "A red bus on a road."]},
        {"image": "val2014/odd_name.jpg", "caption": ["no id in the name"]},
    ]
    test = [
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["file caption one", "file caption two"]},
        {"image": "val2014/COCO_val2014_000000000003.jpg", "caption": ["an image the ground truth lacks"]},
        {"image": "val2014/COCO_val2014_000000000004.jpg", "caption": ["missing image"]},
    ]
    test_gt = {
        "annotations": [
            {"image_id": 391895, "caption": "A man with a red helmet on a small moped on a dirt road. ", "id": 1},
            {"image_id": 4, "caption": "A picture of nothing.", "id": 2},
            {"image_id": 391895, "caption": "Man riding a motor bike on a dirt road.", "id": 3},
        ],
        "images": [{"id": 391895}, {"id": 4}],
    }
    for name, payload in (("coco_karpathy_train.json", train), ("coco_karpathy_val.json", val),
                          ("coco_karpathy_test.json", test), ("coco_karpathy_test_gt.json", test_gt)):
        (ann / name).write_text(json.dumps(payload))
    return {"root": root, "ann": ann, "files": files}


def test_coco_image_id_parses_file_names_like_the_official_evaluation():
    from modeling_xvlm.data import coco_image_id

    assert coco_image_id("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert coco_image_id("COCO_val2014_000000391895.JPG") == 391895
    assert coco_image_id("coco_522418") == 522418  # a Karpathy train image_id
    assert coco_image_id("391895") == 391895 and coco_image_id(391895) == 391895
    with pytest.raises(ValueError, match="no COCO image id in 'val2014/odd_name.jpg'"):
        coco_image_id("val2014/odd_name.jpg")
    with pytest.raises(TypeError, match="expected an image path or id"):
        coco_image_id(True)


def test_captioning_conversion_round_trip(karpathy_official, tmp_path):
    from modeling_xvlm.caption_metrics import caption_metrics
    from modeling_xvlm.data import coco_image_id, load_coco_caption_references

    ann, files, out = karpathy_official["ann"], karpathy_official["files"], tmp_path / "captions"
    summary = convert_official(
        out, tmp_path / "elsewhere", image_roots={"retrieval": karpathy_official["root"]},
        captioning={"train": ann / "coco_karpathy_train.json", "val": ann / "coco_karpathy_val.json",
                    "test": ann / "coco_karpathy_test.json"},
        captioning_gt={"test": ann / "coco_karpathy_test_gt.json"},
    )
    assert summary.written == {"retrieval": {"train": 2, "validation": 1, "test": 1}}
    assert summary.skipped == {"retrieval": {"train": 2, "validation": 1, "test": 2}}
    assert summary.reasons == {"invalid_record": 2, "missing_image": 2, "not_in_gt": 1}
    assert sorted(summary.missing_images) == ["train2014/COCO_train2014_000000000012.jpg",
                                              "val2014/COCO_val2014_000000000004.jpg"]
    # Train: one row per image with its captions in file order (the official one record per caption regrouped).
    train = _rows(out, "retrieval", "train", tmp_path)
    assert [(r["image_id"], r["captions"]) for r in train] == [
        ("coco_10", ["A cat on a mat.", "A sleeping cat."]), ("coco_11", ["A dog."])
    ]
    assert [coco_image_id(r["image_id"]) for r in train] == [10, 11]
    from modeling_xvlm.data import retrieval_pairs

    pairs = retrieval_pairs(load_xvlm_dataset(out, "retrieval", "train", cache_dir=str(tmp_path / "hf")))
    assert pairs["caption"] == ["A cat on a mat.", "A sleeping cat.", "A dog."]  # the official training records
    # Validation keeps the file's captions; the image path is the id, from which the COCO id follows.
    validation = _rows(out, "retrieval", "validation", tmp_path)
    assert [(r["image_id"], r["captions"]) for r in validation] == [
        ("val2014/COCO_val2014_000000000001.jpg", ["A bus.", "A red bus on a road."])
    ]
    # Test takes the ground-truth captions (the official references), raw and in file order.
    test = _rows(out, "retrieval", "test", tmp_path)
    gt = load_coco_caption_references(ann / "coco_karpathy_test_gt.json")
    assert gt == {391895: ["A man with a red helmet on a small moped on a dirt road. ",
                           "Man riding a motor bike on a dirt road."], 4: ["A picture of nothing."]}
    assert [(coco_image_id(r["image_id"]), r["captions"]) for r in test] == [(391895, gt[391895])]
    raw = load_xvlm_dataset(out, "retrieval", "test", cache_dir=str(tmp_path / "hf")).cast_column(
        "image", datasets.Image(decode=False))
    assert raw[0]["image"]["bytes"] == files["val2014/COCO_val2014_000000391895.jpg"]
    # The rows are the references of the metrics.
    references = {coco_image_id(r["image_id"]): r["captions"] for r in test}
    scores = caption_metrics({391895: "a man riding a moped on a dirt road"}, references, metrics=("BLEU-1",),
                             tokenizer="simple")
    assert 0.5 < scores["BLEU-1"] <= 1.0
    report = json.loads((out / "conversion_summary.json").read_text())
    assert any("no COCO image id in 'val2014/odd_name.jpg'" in e for e in report["examples"]["invalid_record"])
    assert report["examples"]["not_in_gt"] == ["val2014/COCO_val2014_000000000003.jpg (COCO id 3)"]


def test_captioning_conversion_errors(karpathy_official, tmp_path):
    ann = karpathy_official["ann"]
    test, gt = ann / "coco_karpathy_test.json", ann / "coco_karpathy_test_gt.json"
    with pytest.raises(ValueError, match=r"retrieval and captioning files both given for split\(s\) \['test'\]"):
        convert_official(tmp_path / "a", ".", retrieval={"test": test}, captioning={"test": test})
    with pytest.raises(ValueError, match=r"ground truth given for split\(s\) \['validation'\] without"):
        convert_official(tmp_path / "b", ".", captioning={"test": test}, captioning_gt={"val": gt})
    with pytest.raises(ValueError, match="validation and test splits only"):
        convert_official(tmp_path / "c", ".", captioning={"train": test}, captioning_gt={"train": gt})
    (ann / "bad_gt.json").write_text(json.dumps({"annotations": [{"image_id": "391895", "caption": "x"}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] needs an integer image_id"):
        convert_official(tmp_path / "d", ".", captioning={"test": test}, captioning_gt={"test": ann / "bad_gt.json"})
    (ann / "list_gt.json").write_text(json.dumps([{"image_id": 1, "caption": "x"}]))
    with pytest.raises(ValueError, match="expected COCO caption annotations"):
        convert_official(tmp_path / "e", ".", captioning={"test": test}, captioning_gt={"test": ann / "list_gt.json"})
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()  # checked before anything is written


def test_cli_convert_official_captioning(karpathy_official, tmp_path, capsys):
    ann, out = karpathy_official["ann"], tmp_path / "cli-captions"
    status = xvlm_data([
        "convert-official", "--out", str(out), "--image-root", str(karpathy_official["root"]),
        "--captioning-train", str(ann / "coco_karpathy_train.json"),
        "--captioning-val", str(ann / "coco_karpathy_val.json"),
        "--captioning-test", str(ann / "coco_karpathy_test.json"),
        "--captioning-test-gt", str(ann / "coco_karpathy_test_gt.json"),
    ])
    printed = capsys.readouterr().out
    assert status == 0
    assert "retrieval/train: 2 rows written, 2 skipped" in printed
    assert "retrieval/validation: 1 rows written, 1 skipped" in printed
    assert "retrieval/test: 1 rows written, 2 skipped" in printed
    assert _rows(out, "retrieval", "test", tmp_path)[0]["captions"][1] == "Man riding a motor bike on a dirt road."
    assert datasets.get_dataset_config_names(str(out)) == ["retrieval"]
    status = xvlm_data([
        "convert-official", "--out", str(tmp_path / "cli2"), "--image-root", str(karpathy_official["root"]),
        "--retrieval-test", str(ann / "coco_karpathy_test.json"),
        "--captioning-test", str(ann / "coco_karpathy_test.json"),
    ])
    assert status == 2 and "both given for split(s) ['test']" in capsys.readouterr().err


# -- per-image failures are skipped and counted; paths never leave the image root -------------------------------


def _blank_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, format="PNG")  # a few KB for millions of pixels: a decompression bomb
    return buffer.getvalue()


def test_decompression_bombs_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; a lower limit makes both cases small here.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(_image_bytes(1, (32, 24), "PNG"))
    (root / "warn.png").write_bytes(_blank_png((1200, 1200)))  # 1.44 M pixels: over the limit
    (root / "bomb.png").write_bytes(_blank_png((2000, 2000)))  # 4 M pixels: over twice the limit
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps([{"image": name, "caption": [name]} for name in ("warn.png", "ok.png", "bomb.png")]))
    out = tmp_path / "out"
    status = xvlm_data(["convert-official", "--out", str(out), "--image-root", str(root), "--retrieval-test",
                        str(ann)])
    printed = capsys.readouterr().out
    assert status == 0
    assert [r["captions"] for r in _rows(out, "retrieval", "test", tmp_path)] == [["ok.png"]]
    report = json.loads((out / "conversion_summary.json").read_text())
    assert report["skip_reasons"] == {"image_too_large": 2} and report["oversized_images"] == 2
    assert [e.split(" ")[0] for e in report["oversized_image_examples"]] == ["warn.png", "bomb.png"]
    assert "too large: warn.png" in printed and "too large: bomb.png" in printed


def test_paths_outside_the_image_root_are_refused_unless_allowed(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    (root / "in.png").write_bytes(_image_bytes(1, (16, 16), "PNG"))
    (tmp_path / "secret.png").write_bytes(_image_bytes(2, (16, 16), "PNG"))
    records = [{"image": "in.png", "caption": ["inside"]}, {"image": "../secret.png", "caption": ["dot-dot"]},
               {"image": str(tmp_path / "secret.png"), "caption": ["absolute"]}]
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps(records))
    summary = convert_official(tmp_path / "refused", root, retrieval={"test": ann})
    rows = _rows(tmp_path / "refused", "retrieval", "test", tmp_path)
    assert [r["captions"] for r in rows] == [["inside"]]
    assert summary.reasons == {"outside_image_root": 2}
    assert summary.outside_root_images == ["../secret.png", str(tmp_path / "secret.png")]

    status = xvlm_data(["convert-official", "--out", str(tmp_path / "allowed"), "--image-root", str(root),
                        "--retrieval-test", str(ann), "--allow-outside-image-root"])
    assert status == 0, capsys.readouterr().err
    rows = list(load_xvlm_dataset(tmp_path / "allowed", "retrieval", "test", cache_dir=str(tmp_path / "hf"))
                .cast_column("image", datasets.Image(decode=False)))
    assert len(rows) == 3
    stored = json.dumps([{k: v for k, v in r.items() if k != "image"} for r in rows]) + json.dumps(
        [r["image"]["path"] for r in rows])
    assert [r["image"]["path"] for r in rows] == ["in.png", "secret.png", "secret.png"]
    assert str(tmp_path) not in stored and ".." not in stored  # no local path outside the root is published
