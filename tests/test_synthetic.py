"""The synthetic-shapes generator: determinism, splits, geometry, language, tokenizer and the written layout."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import datasets
import numpy as np
import pytest

from modeling_xvlm.data.cli import main as xvlm_data
from modeling_xvlm.data.loading import load_vqa_answer_list, load_xvlm_dataset
from modeling_xvlm.data.synthetic import (
    COLOURS,
    GENERATOR_VERSION,
    SHAPES,
    SIZES,
    SyntheticConfig,
    generate_nlvr2_pairs,
    generate_split,
    generate_vqa_questions,
    scene_records,
    synthetic_tokenizer,
    synthetic_vocabulary,
    vqa_answer_list,
    write_synthetic_dataset,
)

SMALL = SyntheticConfig(seed=3, num_train=120, num_validation=40, num_test=110, num_nlvr2_train=200)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(out, SMALL)
    return out


def _load(path: Path, config: str, split: str, tmp_path: Path) -> datasets.Dataset:
    return datasets.load_dataset(str(path), config, split=split, cache_dir=str(tmp_path / "hf"))


# --------------------------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(tmp_path):
    config = dataclasses.replace(SMALL, num_train=30, num_validation=10, num_test=10)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_synthetic_dataset(a, config)
    write_synthetic_dataset(b, config)
    write_synthetic_dataset(c, dataclasses.replace(config, seed=config.seed + 1))
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet")) + [Path("README.md")]
    assert len(files) == 17  # 5 configs x 3 splits + vqa_answers/test + card
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "retrieval/train-00000-of-00001.parquet").read_bytes() != (
        c / "retrieval/train-00000-of-00001.parquet"
    ).read_bytes()


def test_split_does_not_depend_on_other_split_sizes():
    small = [s.captions for s in generate_split(dataclasses.replace(SMALL, num_train=5), "test")]
    large = [s.captions for s in generate_split(dataclasses.replace(SMALL, num_train=500), "test")]
    assert small == large
    first = next(iter(generate_split(SMALL, "validation")))
    again = next(iter(generate_split(SMALL, "validation")))
    assert scene_records(first)["retrieval"]["image"]["bytes"] == scene_records(again)["retrieval"]["image"]["bytes"]


# --------------------------------------------------------------------------------------------------------------------
# Splits and held-out combinations
# --------------------------------------------------------------------------------------------------------------------


def test_heldout_combinations_only_in_test():
    heldout = set(SMALL.heldout_combos)
    for split in ("train", "validation"):
        for scene in generate_split(SMALL, split):
            assert not {(o.colour, o.shape) for o in scene.objects} & heldout
            assert not scene.has_heldout
    test = list(generate_split(SMALL, "test"))
    with_heldout = [s for s in test if s.has_heldout]
    # 25 % by default: a binomial(110, 0.25) draw, far from 0 and from all.
    assert 10 <= len(with_heldout) <= 50
    assert all({(o.colour, o.shape) for o in s.objects} & heldout for s in with_heldout)


def test_validation_and_test_galleries_have_distinct_captions():
    for split in ("validation", "test"):
        scenes = list(generate_split(SMALL, split))
        keys = [tuple(sorted((o.colour, o.shape) for o in s.objects)) for s in scenes]
        assert len(set(keys)) == len(keys)
        captions = [c for s in scenes for c in s.captions]
        assert len(set(captions)) == len(captions)


# --------------------------------------------------------------------------------------------------------------------
# Geometry and language
# --------------------------------------------------------------------------------------------------------------------


def _overlap(a, b) -> bool:
    return not (a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1])


def test_objects_inside_images_and_drawn_where_the_box_says():
    sizes = set()
    for scene in generate_split(SMALL, "train"):
        assert 1 <= len(scene.objects) <= 4
        assert scene.width in SMALL.image_sizes and scene.height in SMALL.image_sizes
        pixels = np.asarray(scene.render(), dtype=np.int16)
        assert pixels.shape == (scene.height, scene.width, 3)
        for i, o in enumerate(scene.objects):
            x, y, w, h = o.bbox
            assert 0 <= x and 0 <= y and x + w <= scene.width and y + h <= scene.height
            lo, hi = SIZES[o.size]
            assert lo * min(scene.width, scene.height) - 1 <= w <= hi * min(scene.width, scene.height) + 1
            for other in scene.objects[i + 1:]:
                assert not _overlap(o.bbox, other.bbox)
            # The centre pixel has the shape's colour (up to the colour jitter).
            centre = pixels[int(y + h / 2), int(x + w / 2)]
            assert np.abs(centre - np.array(COLOURS[o.colour])).max() <= 12
            sizes.add((scene.width, scene.height))
    assert any(w != h for w, h in sizes) and any(w == h for w, h in sizes)


_NOUN = r"(?:(small|large) )?(?:(" + "|".join(COLOURS) + r") )?(" + "|".join(SHAPES) + r"|shape)"


def _matches(obj: dict, size: str | None, colour: str | None, shape: str) -> bool:
    return ((size is None or obj["size"] == size) and (colour is None or obj["colour"] == colour)
            and (shape == "shape" or obj["shape"] == shape))


def _rel(a: dict, b: dict, rel: str) -> bool:
    ax, ay, aw, ah = a["bbox"]
    bx, by, bw, bh = b["bbox"]
    return {"left": ax + aw <= bx, "right": ax >= bx + bw, "above": ay + ah <= by, "below": ay >= by + bh}[rel]


_SIDE = {"on the left": "left", "on the right": "right", "at the top": "above", "at the bottom": "below"}
_REL = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
_EXTREME = {"leftmost": "left", "rightmost": "right", "highest": "above", "lowest": "below"}


def _referents(text: str, objects: list[dict]) -> set[int]:
    """An interpreter of the expression grammar, written independently of the generator."""
    idx = range(len(objects))
    if m := re.fullmatch(r"the (leftmost|rightmost|highest|lowest) shape", text):
        side = _EXTREME[m[1]]
        return {i for i in idx if all(_rel(objects[i], objects[j], side) for j in idx if j != i)}
    if m := re.fullmatch(f"the {_NOUN} ({'|'.join(_SIDE)})", text):
        group = [i for i in idx if _matches(objects[i], m[1], m[2], m[3])]
        side = _SIDE[m[4]]
        return {i for i in group if all(_rel(objects[i], objects[j], side) for j in group if j != i)}
    if m := re.fullmatch(f"the {_NOUN} ({'|'.join(_REL)}) the {_NOUN}", text):
        refs = {j for j in idx if _matches(objects[j], m[5], m[6], m[7])}
        assert len(refs) == 1, f"the reference object of {text!r} is not unique"
        return {i for i in idx if _matches(objects[i], m[1], m[2], m[3]) and i not in refs
                and _rel(objects[i], objects[next(iter(refs))], _REL[m[4]])}
    if m := re.fullmatch(f"the {_NOUN}", text):
        return {i for i in idx if _matches(objects[i], m[1], m[2], m[3])}
    raise AssertionError(f"expression outside the grammar: {text!r}")


def test_every_referring_expression_has_a_unique_referent(written, tmp_path):
    for split in ("train", "test"):
        pretrain = _load(written, "pretrain", split, tmp_path).remove_columns("image")
        scenes = {}
        for row in pretrain:
            objects = []
            for obj in row["objects"]:
                colour, shape = obj["captions"][0].split()
                objects.append({"bbox": obj["bbox"], "colour": colour, "shape": shape, "size": obj["attributes"][0]})
            scenes[row["image_id"]] = objects
        grounding = _load(written, "grounding", split, tmp_path).remove_columns("image")
        kinds = defaultdict(int)
        per_image = defaultdict(set)
        for row in grounding:
            objects = scenes[row["image_id"]]
            referents = _referents(row["text"], objects)
            assert len(referents) == 1, (row["text"], objects)
            assert objects[referents.pop()]["bbox"] == row["bbox"]
            kinds[row["text"].split()[-1] if "of" not in row["text"] else "rel"] += 1
            per_image[row["image_id"]].add(tuple(row["bbox"]))
        # Every object of every image is the referent of some expression.
        assert all(len(per_image[k]) == len(v) for k, v in scenes.items())
        assert len(kinds) >= 5  # several templates are in use


def test_captions_name_every_object_with_a_relation():
    for scene in generate_split(SMALL, "validation"):
        assert len(scene.captions) == 3
        for caption in scene.captions:
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption)
            assert len(caption.split()) <= 30  # the official pre_caption keeps 30 words
            for o in scene.objects:
                assert o.describe() in caption
        if len(scene.objects) >= 2:
            assert re.search(r" (to the left of|to the right of|above|below) ", scene.captions[0])
            assert scene.captions[1].startswith("from left to right")


def test_retrieval_rows_serve_as_captioning_data():
    """Captioning reuses the `retrieval` rows (docs/data.md): three whole-image captions per image, unchanged by the
    official training cleaning (`pre_caption(caption, max_tokens=40)`, configs/Captioning.yaml) and by the metric
    tokenizer, so leave-one-out predictions score as ordinary captions."""
    from modeling_xvlm.caption_metrics import caption_metrics, simple_tokenize
    from modeling_xvlm.processing.text import pre_caption

    rows = [scene_records(scene)["retrieval"] for scene in generate_split(SMALL, "test")]
    assert len({r["image_id"] for r in rows}) == len(rows)
    for row in rows:
        assert len(row["captions"]) == 3
        assert all(pre_caption(c, 40) == c == simple_tokenize(c) for c in row["captions"])
    predictions = {r["image_id"]: r["captions"][0] for r in rows}
    references = {r["image_id"]: r["captions"][1:] for r in rows}
    scores = caption_metrics(predictions, references, metrics=("BLEU-1", "CIDEr"), tokenizer="simple")
    assert 0.3 < scores["BLEU-1"] < 1.0 and 0.0 < scores["CIDEr"] < 10.0


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary and tokenizer
# --------------------------------------------------------------------------------------------------------------------


def test_tokenizer_covers_every_generated_word():
    tokenizer = synthetic_tokenizer()
    vocab = synthetic_vocabulary()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) == len(set(vocab))
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
    assert len(tokenizer) == len(vocab)
    texts = []
    for split in ("train", "test"):
        for scene in generate_split(SMALL, split):
            rows = scene_records(scene)
            texts += rows["retrieval"]["captions"] + [r["text"] for r in rows["grounding"]]
            texts += [c for o in rows["pretrain"]["objects"] for c in o["captions"] + o["attributes"]]
        texts += [p.sentence for p in generate_nlvr2_pairs(SMALL, split)]
        texts += [t for q in generate_vqa_questions(SMALL, split) for t in (q.question, q.answer)]
    words = {w for t in texts for w in t.split()}
    assert words <= set(vocab)
    ids = tokenizer(texts)["input_ids"]
    assert all(tokenizer.unk_token_id not in seq for seq in ids)
    assert ids[0][0] == 2 and ids[0][-1] == 3
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == texts[0]


# --------------------------------------------------------------------------------------------------------------------
# Written layout, CLI and default loading
# --------------------------------------------------------------------------------------------------------------------


def test_written_dataset_loads_with_every_config_and_split(written, tmp_path):
    assert datasets.get_dataset_config_names(str(written)) == [
        "pretrain", "retrieval", "grounding", "nlvr2", "vqa", "vqa_answers"
    ]
    for config in ("pretrain", "retrieval", "grounding"):
        for split, n in (("train", 120), ("validation", 40), ("test", 110)):
            ds = load_xvlm_dataset(written, config, split, cache_dir=str(tmp_path / "hf"))
            if config != "grounding":
                assert len(ds) == n
            row = ds[0]
            assert row["image"].mode == "RGB" and row["image"].size == (row["width"], row["height"])
    test = _load(written, "retrieval", "test", tmp_path)
    assert set(test["group"]) == {"seen", "heldout"}
    assert set(_load(written, "retrieval", "train", tmp_path)["group"]) == {"seen"}
    # The images of the three configs are the same scenes.
    first = _load(written, "pretrain", "test", tmp_path)[0]
    assert np.array_equal(np.asarray(first["image"]), np.asarray(test[0]["image"]))


def test_cli_synthetic(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["synthetic", "--out", str(out), "--seed", "5", "--num-train", "12", "--num-val", "4", "--num-test", "6"]
    assert xvlm_data(args) == 0
    captured = capsys.readouterr()
    assert '"retrieval"' in captured.out
    assert all(f"scenes/{split}" in captured.err for split in ("train", "validation", "test"))  # progress bars
    assert len(_load(out, "retrieval", "test", tmp_path)) == 6
    assert xvlm_data(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert xvlm_data(args + ["--overwrite", "--no-progress"]) == 0
    assert "scenes/" not in capsys.readouterr().err


def test_default_dataset_is_generated_once_in_the_cache(tmp_path):
    config = SyntheticConfig(num_train=8, num_validation=4, num_test=4)
    ds = load_xvlm_dataset(None, "grounding", "test", synthetic_config=config, cache_root=tmp_path / "cache",
                           cache_dir=str(tmp_path / "hf"))
    assert len(ds) >= 4
    folder = next((tmp_path / "cache" / "synthetic").iterdir())
    assert folder.name == config.cache_key() and config.cache_key().startswith(f"v{GENERATOR_VERSION}-seed0")
    stamp = (folder / "xvlm_dataset_info.json").stat().st_mtime_ns
    load_xvlm_dataset(None, "retrieval", "train", synthetic_config=config, cache_root=tmp_path / "cache",
                      cache_dir=str(tmp_path / "hf"))
    assert (folder / "xvlm_dataset_info.json").stat().st_mtime_ns == stamp
    assert load_vqa_answer_list(synthetic_config=config, cache_root=tmp_path / "cache",
                                cache_dir=str(tmp_path / "hf")) == vqa_answer_list()
    assert [p.name for p in (tmp_path / "cache" / "synthetic").iterdir()] == [folder.name]


def test_generation_is_fast():
    import time

    start = time.perf_counter()
    scenes = list(generate_split(SyntheticConfig(num_train=300), "train"))
    for scene in scenes:
        scene_records(scene)
    elapsed = time.perf_counter() - start
    assert len(scenes) == 300
    assert elapsed < 6.0, f"{elapsed:.2f} s for 300 scenes"



# --------------------------------------------------------------------------------------------------------------------
# NLVR2 pairs
# --------------------------------------------------------------------------------------------------------------------

_NUMBER = {"one": 1, "two": 2, "three": 3, "four": 4}
_SINGULAR = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond"}


def _noun(words: str):
    """'red circles' / 'circle' / 'red shape' / 'shapes' -> (colour | None, shape | None)."""
    *colour, last = words.split()
    shape = _SINGULAR.get(last, last)
    assert shape in SHAPES or shape in ("shape", "shapes"), words
    assert len(colour) <= 1 and all(c in COLOURS for c in colour), words
    return (colour[0] if colour else None), (shape if shape in SHAPES else None)


def _count(objects, noun) -> int:
    colour, shape = noun
    return sum((colour is None or o.colour == colour) and (shape is None or o.shape == shape) for o in objects)


def _truth(sentence: str, left, right) -> bool:
    """The truth of a statement, worked out here from the scenes' objects (independently of the generator)."""
    side = {"left": left.objects, "right": right.objects}
    if m := re.fullmatch(r"the (left|right) image has (more|fewer) (.+) than the (left|right) image", sentence):
        assert m[1] != m[4]
        a, b = _count(side[m[1]], _noun(m[3])), _count(side[m[4]], _noun(m[3]))
        return a > b if m[2] == "more" else a < b
    if m := re.fullmatch(r"both images have the same number of (.+)", sentence):
        return _count(left.objects, _noun(m[1])) == _count(right.objects, _noun(m[1]))
    if m := re.fullmatch(r"(both images contain|exactly one image contains|neither image contains) a (.+)", sentence):
        present = [_count(objects, _noun(m[2])) > 0 for objects in (left.objects, right.objects)]
        return {"both images contain": all(present), "exactly one image contains": sum(present) == 1,
                "neither image contains": not any(present)}[m[1]]
    if m := re.fullmatch(r"the (left|right) image has exactly (one|two|three|four) (.+)", sentence):
        return _count(side[m[1]], _noun(m[3])) == _NUMBER[m[2]]
    if m := re.fullmatch(r"there are exactly (one|two|three|four) (.+) in total", sentence):
        return _count(left.objects, _noun(m[2])) + _count(right.objects, _noun(m[2])) == _NUMBER[m[1]]
    rel = r"(to the left of|to the right of|above|below)"
    if m := re.fullmatch(rf"in the (left|right) image a (\w+ \w+) is {rel} a (\w+ \w+)", sentence):
        a_noun, b_noun = _noun(m[2]), _noun(m[4])
        objects = side[m[1]]
        for i, a in enumerate(objects):
            for j, b in enumerate(objects):
                if i == j or (a.colour, a.shape) != a_noun or (b.colour, b.shape) != b_noun:
                    continue
                if {"to the left of": a.x + a.side <= b.x, "to the right of": a.x >= b.x + b.side,
                        "above": a.y + a.side <= b.y, "below": a.y >= b.y + b.side}[m[3]]:
                    return True
        return False
    raise AssertionError(f"unknown statement template: {sentence!r}")


def test_nlvr2_statements_are_true_exactly_when_labelled():
    kinds = set()
    for split in ("train", "validation", "test"):
        pairs = generate_nlvr2_pairs(SMALL, split)
        assert len(pairs) == SMALL.num_nlvr2_pairs(split)
        scene_ids = {s.image_id for s in generate_split(SMALL, split)}
        for pair in pairs:
            assert pair.left.image_id != pair.right.image_id
            assert {pair.left.image_id, pair.right.image_id} <= scene_ids  # images of the same split
            assert pair.label in (0, 1)
            assert _truth(pair.sentence, pair.left, pair.right) == bool(pair.label), pair
            kinds.add(pair.kind)
    assert kinds == {"compare", "exists", "count", "spatial"}


def test_nlvr2_labels_are_balanced():
    config = dataclasses.replace(SMALL, num_nlvr2_train=501, num_nlvr2_validation=40, num_nlvr2_test=7)
    for split in ("train", "validation", "test"):
        labels = [p.label for p in generate_nlvr2_pairs(config, split)]
        assert abs(2 * sum(labels) - len(labels)) <= 1, (split, sum(labels), len(labels))
    pairs = generate_nlvr2_pairs(config, "train")
    for kind in ("compare", "exists", "count"):  # no template is (almost) always true or always false
        labels = [p.label for p in pairs if p.kind == kind]
        assert 0.3 <= sum(labels) / len(labels) <= 0.7, kind
    assert len({p.sentence for p in pairs}) > 250


def test_nlvr2_pairs_are_deterministic():
    def key(config, split):
        return [(p.identifier, p.left.image_id, p.right.image_id, p.sentence, p.label)
                for p in generate_nlvr2_pairs(config, split)]

    assert key(SMALL, "train") == key(SMALL, "train")
    assert key(SMALL, "train") != key(dataclasses.replace(SMALL, seed=SMALL.seed + 1), "train")
    assert key(dataclasses.replace(SMALL, num_nlvr2_validation=5), "validation") == key(SMALL, "validation")[:5]
    assert key(dataclasses.replace(SMALL, num_test=50, num_nlvr2_train=3), "validation") == key(SMALL, "validation")
    with pytest.raises(ValueError, match="at least 2 images"):
        SyntheticConfig(num_validation=1, num_nlvr2_validation=1)
    assert SyntheticConfig(num_validation=1).num_nlvr2_pairs("validation") == 0
    assert [SyntheticConfig().num_nlvr2_pairs(s) for s in ("train", "validation", "test")] == [3000, 150, 150]
    assert SMALL.num_nlvr2_pairs("test") == 82


def test_nlvr2_written_rows_match_the_pairs(written, tmp_path):
    rows = load_xvlm_dataset(written, "nlvr2", "validation", cache_dir=str(tmp_path / "hf"))
    pairs = generate_nlvr2_pairs(SMALL, "validation")
    assert len(rows) == SMALL.num_nlvr2_pairs("validation") == len(pairs) == 30
    assert rows["identifier"] == [p.identifier for p in pairs]
    assert rows["sentence"] == [p.sentence for p in pairs] and rows["label"] == [p.label for p in pairs]
    for row, pair in list(zip(rows, pairs))[:5]:
        assert np.array_equal(np.asarray(row["left_image"]), np.asarray(pair.left.render()))
        assert np.array_equal(np.asarray(row["right_image"]), np.asarray(pair.right.render()))
    assert len(load_xvlm_dataset(written, "nlvr2", "train", cache_dir=str(tmp_path / "hf"))) == 200


def test_cli_synthetic_nlvr2_sizes(tmp_path, capsys):
    out = tmp_path / "cli"
    assert xvlm_data(["synthetic", "--out", str(out), "--num-train", "6", "--num-val", "4", "--num-test", "4",
                      "--num-nlvr2-train", "9", "--num-nlvr2-val", "3", "--num-nlvr2-test", "0"]) == 0
    capsys.readouterr()
    assert len(_load(out, "nlvr2", "train", tmp_path)) == 9
    assert len(_load(out, "nlvr2", "validation", tmp_path)) == 3
    assert not list((out / "nlvr2").glob("test-*"))



# --------------------------------------------------------------------------------------------------------------------
# VQA questions
# --------------------------------------------------------------------------------------------------------------------

_COLOUR = "(" + "|".join(COLOURS) + ")"
_SHAPE = "(" + "|".join(SHAPES) + ")"


def _select(objects, colour=None, shape=None, size=None):
    return [o for o in objects if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
            and (size is None or o.size == size)]


def _side_of_centre(o, width, height) -> str:
    """Where the box is relative to the image centre; it must be on exactly one side."""
    x, y, w, h = o.bbox
    sides = [name for name, holds in (
        ("left", x + w <= width / 2 and y < height / 2 < y + h),
        ("right", x >= width / 2 and y < height / 2 < y + h),
        ("top", y + h <= height / 2 and x < width / 2 < x + w),
        ("bottom", y >= height / 2 and x < width / 2 < x + w),
    ) if holds]
    assert len(sides) == 1, (o, width, height)
    return sides[0]


def _vqa_answer(question: str, scene) -> str:
    """The answer of a question, worked out here from the scene's objects (independently of the generator)."""
    objects = scene.objects
    if m := re.fullmatch(rf"what color is the (?:(small|large) )?{_SHAPE}", question):
        (target,) = _select(objects, shape=m[2], size=m[1])  # the noun must name exactly one object
        return target.colour
    if m := re.fullmatch(rf"what shape is the (?:(small|large) )?{_COLOUR} object", question):
        (target,) = _select(objects, colour=m[2], size=m[1])
        return target.shape
    if m := re.fullmatch(r"how many (.+) are there", question):
        count = _count(objects, _noun(m[1]))
        assert count >= 1, question
        return ["zero", "one", "two", "three", "four"][count]
    if m := re.fullmatch(rf"is there a (?:{_COLOUR} )?(\w+)", question):
        colour, shape = m[1], None if m[2] == "shape" else m[2]
        assert (colour or shape) and (shape is None or shape in SHAPES), question
        return "yes" if _select(objects, colour=colour, shape=shape) else "no"
    if m := re.fullmatch(rf"where is the (?:{_COLOUR} )?(\w+)", question):
        colour, shape = m[1], None if m[2] == "object" else m[2]
        assert (colour or shape) and (shape is None or shape in SHAPES), question
        (target,) = _select(objects, colour=colour, shape=shape)
        return _side_of_centre(target, scene.width, scene.height)
    raise AssertionError(f"unknown question template: {question!r}")


def test_vqa_answers_are_determined_by_the_scene():
    answers = set(vqa_answer_list())
    assert vqa_answer_list() == sorted(answers) and len(answers) == 20
    kinds = defaultdict(set)
    for split in ("train", "validation", "test"):
        questions = generate_vqa_questions(SMALL, split)
        scenes = list(generate_split(SMALL, split))
        assert len(questions) == SMALL.num_vqa_questions(split) == 3 * len(scenes)
        assert [q.question_id for q in questions] == list(range(len(questions)))
        for q in questions:
            assert q.scene.image_id == scenes[q.question_id % len(scenes)].image_id
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", q.question)  # pre_question leaves it unchanged
            assert _vqa_answer(q.question, q.scene) == q.answer, q
            assert q.answer in answers
            kinds[q.kind].add(q.answer)
        per_scene = defaultdict(list)
        for q in questions:
            per_scene[q.scene.image_id].append(q.question)
        assert all(len(set(v)) == len(v) == 3 for v in per_scene.values())  # three different questions per image
    assert kinds["exists"] == {"yes", "no"}
    assert kinds["position"] == {"left", "right", "top", "bottom"}
    assert kinds["colour"] == set(COLOURS) and kinds["shape"] == set(SHAPES)
    assert kinds["count"] >= {"one", "two", "three"}
    assert set().union(*kinds.values()) == answers  # every listed answer occurs


def test_vqa_yes_no_answers_are_balanced():
    config = dataclasses.replace(SMALL, num_vqa_train=1001, num_vqa_validation=7)
    for split in ("train", "validation", "test"):
        answers = [q.answer for q in generate_vqa_questions(config, split) if q.kind == "exists"]
        assert answers and abs(answers.count("yes") - answers.count("no")) <= 1, (split, answers.count("yes"))
        assert set(answers) <= {"yes", "no"}
    kinds = [q.kind for q in generate_vqa_questions(config, "train")]
    assert all(kinds.count(k) > 0.05 * len(kinds) for k in ("exists", "count", "colour", "shape", "position"))


def test_vqa_questions_are_deterministic_and_do_not_change_the_other_configs(tmp_path):
    def key(config, split):
        return [(q.question_id, q.scene.image_id, q.question, q.answer, q.kind)
                for q in generate_vqa_questions(config, split)]

    assert key(SMALL, "train") == key(SMALL, "train")
    assert key(SMALL, "train") != key(dataclasses.replace(SMALL, seed=SMALL.seed + 1), "train")
    assert key(dataclasses.replace(SMALL, num_vqa_validation=5), "validation") == key(SMALL, "validation")[:5]
    assert key(dataclasses.replace(SMALL, num_nlvr2_validation=3, num_test=7), "validation") == key(SMALL, "validation")
    assert [SyntheticConfig().num_vqa_questions(s) for s in ("train", "validation", "test")] == [12000, 600, 600]
    with pytest.raises(ValueError, match="at least 1 image"):
        SyntheticConfig(num_validation=0, num_vqa_validation=1)
    with pytest.raises(ValueError, match="num_vqa_test must be >= 0"):
        SyntheticConfig(num_vqa_test=-1)
    # The VQA questions draw from their own random stream: the rows of the other configs do not depend on them.
    config = dataclasses.replace(SMALL, num_train=10, num_validation=4, num_test=4)
    write_synthetic_dataset(tmp_path / "with", config)
    write_synthetic_dataset(tmp_path / "without", dataclasses.replace(
        config, num_vqa_train=0, num_vqa_validation=0, num_vqa_test=0))
    for name in ("pretrain", "retrieval", "grounding", "nlvr2"):
        for shard in (tmp_path / "with" / name).iterdir():
            assert shard.read_bytes() == (tmp_path / "without" / name / shard.name).read_bytes(), shard
    assert not (tmp_path / "without" / "vqa").exists() and (tmp_path / "without" / "vqa_answers").is_dir()


def test_vqa_written_rows_match_the_questions(written, tmp_path):
    rows = load_xvlm_dataset(written, "vqa", "validation", cache_dir=str(tmp_path / "hf"))
    questions = generate_vqa_questions(SMALL, "validation")
    assert len(rows) == len(questions) == 120
    assert rows["question_id"] == [q.question_id for q in questions]
    assert rows["question"] == [q.question for q in questions]
    assert rows["answers"] == [[q.answer] * 10 for q in questions]  # ten agreeing annotators, as VQA v2
    assert rows["group"] == [q.kind for q in questions] and set(rows["source"]) == {""}
    assert rows["image_id"] == [q.scene.image_id for q in questions]
    for row, q in list(zip(rows, questions))[:5]:
        assert np.array_equal(np.asarray(row["image"]), np.asarray(q.scene.render()))
    assert load_vqa_answer_list(written, cache_dir=str(tmp_path / "hf")) == vqa_answer_list()
    assert len(load_xvlm_dataset(written, "vqa", "test", cache_dir=str(tmp_path / "hf"))) == 330


def test_cli_synthetic_vqa_sizes(tmp_path, capsys):
    out = tmp_path / "cli"
    assert xvlm_data(["synthetic", "--out", str(out), "--num-train", "6", "--num-val", "4", "--num-test", "4",
                      "--num-vqa-train", "7", "--num-vqa-val", "2", "--num-vqa-test", "0"]) == 0
    capsys.readouterr()
    assert _load(out, "vqa", "train", tmp_path)["question_id"] == list(range(7))
    assert len(_load(out, "vqa", "validation", tmp_path)) == 2
    assert not (out / "vqa" / "test-00000-of-00001.parquet").exists()
    assert _load(out, "vqa_answers", "test", tmp_path)["answer"] == vqa_answer_list()
