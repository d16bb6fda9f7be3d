"""Schemas of the X-VLM dataset configurations, the folder writer and the schema checks of the loader."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from modeling_xvlm.data.loading import (
    load_vqa_answer_list,
    load_xvlm_dataset,
    retrieval_pairs,
)
from modeling_xvlm.data.schemas import (
    CONFIG_NAMES,
    DatasetFolderWriter,
    SchemaMismatchError,
    check_features,
    clip_bbox,
    feature_mismatches,
    get_features,
    validate_record,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _records():
    images = [_image(i, size) for i, size in enumerate([(40, 30), (32, 32), (24, 48)])]
    pretrain = [
        {"image": {"bytes": _png(images[0]), "path": "a.png"}, "image_id": "a", "width": 40, "height": 30,
         "captions": ["a red circle", "a circle"],
         "objects": [{"bbox": [1.0, 2.0, 10.5, 5.0], "captions": ["circle"], "attributes": ["red", "small"]},
                     {"bbox": [0.0, 0.0, 40.0, 30.0], "captions": ["everything"], "attributes": []}],
         "group": "regions"},
        {"image": images[1], "image_id": "b", "width": 32, "height": 32, "captions": ["only text"], "objects": [],
         "group": "image_text"},
    ]
    retrieval = [
        {"image": _png(images[2]), "image_id": "c", "width": 24, "height": 48, "captions": ["x", "y", "z"],
         "group": ""},
    ]
    grounding = [
        {"image": {"bytes": _png(images[0]), "path": None}, "image_id": "a", "width": 40, "height": 30,
         "text": "the red circle", "bbox": [1.0, 2.0, 10.5, 5.0], "ref_id": 7, "group": "testA"},
        {"image": {"bytes": _png(images[1]), "path": None}, "image_id": "b", "width": 32, "height": 32,
         "text": "the thing", "bbox": [30.0, 30.0, 2.0, 2.0], "ref_id": 2**40, "group": "testB"},
    ]
    return images, {"pretrain": pretrain, "retrieval": retrieval, "grounding": grounding}


def test_features_of_each_config():
    assert CONFIG_NAMES == ("pretrain", "retrieval", "grounding", "nlvr2", "vqa", "vqa_answers")
    common = {"image", "image_id", "width", "height", "group"}
    assert set(get_features("pretrain")) == common | {"captions", "objects"}
    assert set(get_features("retrieval")) == common | {"captions"}
    assert set(get_features("grounding")) == common | {"text", "bbox", "ref_id"}
    assert isinstance(get_features("grounding")["image"], datasets.Image)
    assert get_features("grounding")["bbox"].length == 4
    assert set(get_features("pretrain")["objects"].feature) == {"bbox", "captions", "attributes"}
    nlvr2 = get_features("nlvr2")
    assert list(nlvr2) == ["identifier", "left_image", "right_image", "sentence", "label"]
    assert isinstance(nlvr2["left_image"], datasets.Image) and isinstance(nlvr2["right_image"], datasets.Image)
    assert nlvr2["label"].dtype == "int64" and nlvr2["identifier"].dtype == "string"
    vqa = get_features("vqa")
    assert list(vqa) == ["question_id", "image", "image_id", "question", "answers", "source", "group"]
    assert isinstance(vqa["image"], datasets.Image) and vqa["question_id"].dtype == "int64"
    assert vqa["image_id"].dtype == get_features("retrieval")["image_id"].dtype == "string"
    assert isinstance(vqa["answers"], datasets.List) and vqa["answers"].feature.dtype == "string"
    assert {k: v.dtype for k, v in get_features("vqa_answers").items()} == {"answer": "string"}
    with pytest.raises(KeyError, match="vqa_answers"):
        get_features("captioning")


def test_round_trip_through_parquet_and_load_dataset(tmp_path):
    images, records = _records()
    out = tmp_path / "ds"
    with DatasetFolderWriter(out) as writer:
        for config, rows in records.items():
            for row in rows:
                writer.add(config, "test", row)
        writer.add("retrieval", "train", records["retrieval"][0])
    assert writer.counts == {"pretrain": {"test": 2}, "retrieval": {"train": 1, "test": 1}, "grounding": {"test": 2}}
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in card["configs"]] == ["pretrain", "retrieval", "grounding"]
    assert card["configs"][1]["data_files"] == [
        {"split": "train", "path": "retrieval/train-*.parquet"}, {"split": "test", "path": "retrieval/test-*.parquet"}
    ]
    assert (out / "grounding" / "test-00000-of-00001.parquet").is_file()

    pixel_of = {"a": images[0], "b": images[1], "c": images[2]}
    for config, rows in records.items():
        loaded = datasets.load_dataset(str(out), config, split="test", cache_dir=str(tmp_path / "hf"))
        check_features(loaded.features, config)
        assert len(loaded) == len(rows)
        for row, original in zip(loaded, rows):
            assert isinstance(row["image"], Image.Image)
            assert np.array_equal(np.asarray(row["image"]), np.asarray(pixel_of[original["image_id"]]))
            expected = {k: v for k, v in original.items() if k != "image"}
            assert {k: v for k, v in row.items() if k != "image"} == expected


def test_many_shards_are_named_and_all_loaded(tmp_path):
    _, records = _records()
    out = tmp_path / "ds"
    with DatasetFolderWriter(out, max_shard_bytes=1, row_group_size=2) as writer:
        for i in range(7):
            writer.add("retrieval", "train", {**records["retrieval"][0], "image_id": str(i)})
    names = sorted(p.name for p in (out / "retrieval").iterdir())
    assert names == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    loaded = datasets.load_dataset(str(out), "retrieval", split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded["image_id"] == [str(i) for i in range(7)]


def test_writer_refuses_invalid_records_and_non_empty_folders(tmp_path):
    _, records = _records()
    bad = dict(records["grounding"][0], bbox=[35.0, 2.0, 10.0, 5.0])  # x + w > width
    with pytest.raises(ValueError, match="not inside the 40x30 image"):
        DatasetFolderWriter(tmp_path / "a").add("grounding", "train", bad)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        DatasetFolderWriter(tmp_path / "b")


def test_validate_record_reports_value_problems():
    _, records = _records()
    assert all(not validate_record(r, c) for c, rows in records.items() for r in rows)
    row = dict(records["pretrain"][0])
    row["objects"] = [{"bbox": [0, 0, 0, 5], "captions": [], "attributes": [""]}]
    row["captions"] = ["ok", ""]
    problems = validate_record(row, "pretrain")
    assert any("non-positive size" in p for p in problems)
    assert any("objects[0].captions" in p for p in problems)
    assert any("attributes" in p for p in problems)
    assert any(p.startswith("captions must be") for p in problems)
    assert validate_record({"image": None}, "grounding")[0].startswith("missing field")
    assert clip_bbox([-5, 2, 10, 100], 40, 30) == [0.0, 2.0, 5.0, 28.0]
    assert clip_bbox([50, 2, 10, 10], 40, 30) is None


def test_feature_mismatches_are_listed():
    features = get_features("grounding")
    del features["bbox"]
    features["ref_id"] = datasets.Value("string")
    features["extra"] = datasets.Value("int8")  # extra columns are allowed
    problems = feature_mismatches(features, "grounding")
    assert len(problems) == 2
    assert "missing column 'bbox'" in problems[0] and "length=4" in problems[0]
    assert "'ref_id' is Value('string'), expected Value('int64')" in problems[1]
    with pytest.raises(SchemaMismatchError, match="X-VLM 'grounding' schema"):
        check_features(features, "grounding", where="my data")
    assert feature_mismatches(get_features("retrieval"), "retrieval") == []


def test_loader_reports_schema_mismatch_and_missing_config(tmp_path):
    # A folder whose "grounding" config has boxes as a string column.
    out = tmp_path / "bad"
    (out / "grounding").mkdir(parents=True)
    features = get_features("grounding")
    features["bbox"] = datasets.Value("string")
    datasets.Dataset.from_dict(
        {"image": [_image(0)], "image_id": ["a"], "width": [40], "height": [30], "text": ["t"], "bbox": ["1 2 3 4"],
         "ref_id": [1], "group": [""]}, features=features,
    ).to_parquet(str(out / "grounding" / "test-00000-of-00001.parquet"))
    (out / "README.md").write_text(
        "---\nconfigs:\n- config_name: grounding\n  data_files:\n"
        "  - split: test\n    path: grounding/test-*.parquet\n---\n"
    )
    with pytest.raises(SchemaMismatchError, match="column 'bbox' is Value"):
        load_xvlm_dataset(out, "grounding", "test", cache_dir=str(tmp_path / "hf"))
    assert len(load_xvlm_dataset(out, "grounding", "test", validate=False, cache_dir=str(tmp_path / "hf"))) == 1
    with pytest.raises(ValueError, match="no X-VLM configuration 'retrieval'"):
        load_xvlm_dataset(out, "retrieval", "test", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="unknown X-VLM configuration"):
        load_xvlm_dataset(out, "captioning", "test")
    with pytest.raises(ValueError, match="no X-VLM configuration 'vqa'"):
        load_xvlm_dataset(out, "vqa", "test", cache_dir=str(tmp_path / "hf"))


def test_retrieval_pairs_expand_captions(tmp_path):
    images, records = _records()
    out = tmp_path / "ds"
    with DatasetFolderWriter(out) as writer:
        writer.add("retrieval", "train", records["retrieval"][0])
        writer.add("retrieval", "train", {**records["retrieval"][0], "image_id": "d", "captions": ["w"]})
    ds = load_xvlm_dataset(out, "retrieval", "train", cache_dir=str(tmp_path / "hf"))
    pairs = retrieval_pairs(ds)
    assert pairs["caption"] == ["x", "y", "z", "w"]
    assert pairs["image_id"] == ["c", "c", "c", "d"]
    assert pairs["image_index"] == [0, 0, 0, 1]
    assert np.array_equal(np.asarray(pairs[3]["image"]), np.asarray(images[2]))


def test_regenerating_in_place_is_not_hidden_by_the_datasets_cache(tmp_path):
    """``load_dataset`` keys its cache on the card for card-declared configs; the card records the content sizes."""
    _, records = _records()
    out, cache = tmp_path / "ds", str(tmp_path / "hf")
    with DatasetFolderWriter(out) as writer:
        writer.add("retrieval", "test", records["retrieval"][0])
    assert load_xvlm_dataset(out, "retrieval", "test", cache_dir=cache)["captions"] == [["x", "y", "z"]]
    with DatasetFolderWriter(out, overwrite=True) as writer:
        writer.add("retrieval", "test", {**records["retrieval"][0], "captions": ["another caption"]})
    assert load_xvlm_dataset(out, "retrieval", "test", cache_dir=cache)["captions"] == [["another caption"]]


def _nlvr2_record(**overrides):
    record = {"identifier": "dev-1-0-0", "left_image": _png(_image(5)), "right_image": _image(6, (24, 20)),
              "sentence": "the left image has two dogs", "label": 1}
    return {**record, **overrides}


def test_nlvr2_records_are_validated_with_clear_errors(tmp_path):
    assert validate_record(_nlvr2_record(), "nlvr2") == []
    assert validate_record({"identifier": "x"}, "nlvr2") == [
        "missing field 'left_image'", "missing field 'right_image'", "missing field 'sentence'", "missing field 'label'"
    ]
    problems = validate_record(_nlvr2_record(identifier="", sentence="  ", label="True", right_image=None), "nlvr2")
    assert any(p.startswith("identifier must be a non-empty string") for p in problems)
    assert any(p.startswith("sentence must be a non-empty string") for p in problems)
    assert any("label must be the integer 1 (true) or 0 (false), got 'True'" in p for p in problems)
    assert any("right_image is missing" in p for p in problems)
    assert len(problems) == 4
    for bad in (2, -1, True, 0.5):
        assert validate_record(_nlvr2_record(label=bad), "nlvr2"), bad
    with pytest.raises(ValueError, match="invalid 'nlvr2' record 'dev-1-0-0': label must be"):
        DatasetFolderWriter(tmp_path / "a").add("nlvr2", "train", _nlvr2_record(label=3))


def test_nlvr2_round_trip_and_schema_mismatch(tmp_path):
    out = tmp_path / "ds"
    with DatasetFolderWriter(out) as writer:
        writer.add("nlvr2", "validation", _nlvr2_record())
        writer.add("nlvr2", "validation", _nlvr2_record(identifier="dev-2-0-1", label=0, sentence="no dogs"))
    assert writer.counts == {"nlvr2": {"validation": 2}}
    card = (out / "README.md").read_text()
    assert "config_name: nlvr2" in card and "`label`: Value('int64')" in card
    rows = load_xvlm_dataset(out, "nlvr2", "validation", cache_dir=str(tmp_path / "hf"))
    assert rows["label"] == [1, 0] and rows["identifier"] == ["dev-1-0-0", "dev-2-0-1"]
    assert np.array_equal(np.asarray(rows[0]["left_image"]), np.asarray(_image(5)))
    assert np.array_equal(np.asarray(rows[1]["right_image"]), np.asarray(_image(6, (24, 20))))

    features = get_features("nlvr2")
    features["label"] = datasets.Value("string")
    del features["right_image"]
    problems = feature_mismatches(features, "nlvr2")
    assert problems == ["missing column 'right_image' (expected Image())",
                        "column 'label' is Value('string'), expected Value('int64')"]
    with pytest.raises(SchemaMismatchError, match="X-VLM 'nlvr2' schema"):
        check_features(features, "nlvr2")


# --------------------------------------------------------------------------------------------------------------------
# VQA (official dataset/vqa_dataset.py) and its answer list
# --------------------------------------------------------------------------------------------------------------------


def _vqa_record(**overrides):
    record = {"question_id": 262148000, "image": _png(_image(7)), "image_id": "val2014/COCO_val2014_000000262148.jpg",
              "question": "Where is he looking?", "answers": ["down"] * 7 + ["at table", "skateboard", "table"],
              "source": "vqa", "group": ""}
    return {**record, **overrides}


def test_vqa_records_are_validated_with_clear_errors(tmp_path):
    assert validate_record(_vqa_record(), "vqa") == []
    assert validate_record(_vqa_record(answers=[], source=""), "vqa") == []  # an unannotated test question
    assert validate_record({"question_id": 1}, "vqa")[0] == "missing field 'image'"
    problems = validate_record(
        _vqa_record(question_id="7", image=None, image_id="", question=" ", answers="down", source=None), "vqa"
    )
    assert problems == [
        "question_id must be an integer, got '7'", "image is missing (None)",
        "image_id must be a non-empty string, got ''", "question must be a non-empty string, got ' '",
        "answers must be a list of strings, got 'down'", "source must be a string, got None",
    ]
    assert validate_record(_vqa_record(question_id=True), "vqa") == ["question_id must be an integer, got True"]
    assert validate_record({"answer": "yes"}, "vqa_answers") == []
    assert validate_record({"answer": ""}, "vqa_answers") == ["answer must be a non-empty string, got ''"]
    with pytest.raises(ValueError, match="invalid 'vqa' record 5: answers must be"):
        DatasetFolderWriter(tmp_path / "a").add("vqa", "train", _vqa_record(question_id=5, answers=[1]))


def test_vqa_round_trip_and_answer_list(tmp_path):
    out = tmp_path / "ds"
    rows = [_vqa_record(),
            _vqa_record(question_id=-1, image=_image(8, (20, 28)), image_id="vg/1.jpg", question="What is red?",
                        answers=["the bus"], source="vg"),
            _vqa_record(question_id=2**40, answers=[], source="", group="testdev")]
    with DatasetFolderWriter(out) as writer:
        for row in rows[:2]:
            writer.add("vqa", "train", row)
        writer.add("vqa", "test", rows[2])
        for answer in ["yes", "no", "2", "down"]:
            writer.add("vqa_answers", "test", {"answer": answer})
    assert writer.counts == {"vqa": {"train": 2, "test": 1}, "vqa_answers": {"test": 4}}
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in card["configs"]] == ["vqa", "vqa_answers"]
    assert card["configs"][1]["data_files"] == [{"split": "test", "path": "vqa_answers/test-*.parquet"}]
    cache = str(tmp_path / "hf")
    train = datasets.load_dataset(str(out), "vqa", split="train", cache_dir=cache)
    check_features(train.features, "vqa")
    for row, original, image in zip(train, rows, [_image(7), _image(8, (20, 28))]):
        assert np.array_equal(np.asarray(row["image"]), np.asarray(image))
        assert {k: v for k, v in row.items() if k != "image"} == {k: v for k, v in original.items() if k != "image"}
    test = load_xvlm_dataset(out, "vqa", "test", cache_dir=cache)
    assert test[0]["answers"] == [] and test[0]["question_id"] == 2**40 and test[0]["group"] == "testdev"
    assert load_vqa_answer_list(out, cache_dir=cache) == ["yes", "no", "2", "down"]  # file order, not sorted
    with pytest.raises(ValueError, match="no split 'train'"):
        load_xvlm_dataset(out, "vqa_answers", "train", cache_dir=cache)



def test_images_stay_embedded_when_their_path_is_a_local_file(tmp_path, monkeypatch):
    """``datasets.Image.encode_example`` keeps only the path of an existing file; the writer must keep the bytes."""
    data = _png(_image(9))
    (tmp_path / "img.png").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ds"
    with DatasetFolderWriter(out) as writer:
        writer.add("retrieval", "test", {"image": {"bytes": data, "path": "img.png"}, "image_id": "i", "width": 40,
                                         "height": 30, "captions": ["x"], "group": ""})
        writer.add("vqa", "test", _vqa_record(image={"bytes": data, "path": str(tmp_path / "img.png")}))
    (tmp_path / "img.png").unlink()
    for config in ("retrieval", "vqa"):
        raw = load_xvlm_dataset(out, config, "test", cache_dir=str(tmp_path / "hf")).cast_column(
            "image", datasets.Image(decode=False))
        assert raw[0]["image"]["bytes"] == data
