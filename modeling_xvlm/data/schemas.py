"""Hub-format schemas of the X-VLM datasets and the on-disk layout that holds them.

One dataset folder holds several *configurations* (subsets), each with its own ``datasets.Features``:

``pretrain``
    Image-text and region/object pre-training data (official `ImageTextJsonDataset` and `RegionTextJsonDataset`): ``image``, ``image_id``, ``width``,
    ``height``, ``captions`` (the whole-image caption(s); an official ``caption: str`` becomes a one-element list, a
    region-only record has ``[]``), ``objects`` (a list of ``{bbox: [x, y, w, h] pixels, captions: [str], attributes:
    [str]}``, the official ``elems``) and ``group``.
``retrieval``
    Image-text retrieval (official ``dataset/re_dataset.py``, ``coco_train/val/test.json``): one row per image with ``captions`` (every
    caption of the image), ``image_id``, ``width``, ``height`` and ``group``. Training code samples one caption per
    image, or expands the rows into pairs with :func:`modeling_xvlm.data.loading.retrieval_pairs`. Image
    captioning (official ``dataset/coco_karpathy_dataset.py``, ``coco_karpathy_train/val/test.json``) uses the same
    rows: ``captions`` are the training targets / the evaluation references.
``grounding``
    Referring-expression grounding with boxes (official ``dataset/grounding_dataset.py``, RefCOCO+): one row per expression with ``text``,
    ``bbox`` (``[x, y, w, h]`` pixels of the referent), ``ref_id``, ``image_id``, ``width``, ``height``, ``group``;
    optionally ``candidate_boxes`` (``[[x, y, w, h], ...]`` pixels: the detections that weakly supervised Grad-CAM
    grounding ranks, official ``refcoco+/dets.json``; ``[]`` when a row has none).

``nlvr2``
    Natural Language for Visual Reasoning (official ``dataset/nlvr_dataset.py``, ``nlvr_train/dev/test.json``): one
    row per (image pair, sentence) with ``identifier``, ``left_image``, ``right_image`` (the official ``images[0]`` /
    ``images[1]``), ``sentence`` and ``label`` (``1``: the sentence is true of the pair, ``0``: false). It has no
    ``image``/``image_id``/``width``/``height``/``group`` columns.

``vqa``
    Visual question answering (official ``dataset/vqa_dataset.py``, ``vqa_train/val/test.json``, ``vg_qa.json``): one
    row per question with ``question_id``, ``image``, ``image_id``, ``question`` (raw, uncleaned), ``answers`` (the
    annotators' answers as the official file gives them, repetitions kept; ``[]`` for unannotated test questions),
    ``source`` (the official ``dataset`` field: ``vqa`` / ``vg`` / ``gqa``, ``""`` when absent; it decides the
    training weights, see :func:`modeling_xvlm.training.vqa_answer_weights`) and ``group``. No ``width``/``height``.
``vqa_answers``
    The candidate answers of the official ranking evaluation (official ``answer_list.json``): one row per answer with
    ``answer``, in file order, in the ``test`` split only.

``group`` is a free-form evaluation group (``""`` when unused): the RefCOCO+ split of a reference (``val``, ``testA``,
``testB``), ``seen`` / ``heldout`` in the synthetic dataset, ``image_text`` / ``regions`` for pre-training sources, the
question kind of the synthetic ``vqa`` rows.

On disk (the layout written by :class:`DatasetFolderWriter`)::

    DIR/README.md                                  dataset card; its YAML ``configs:`` block declares every subset
    DIR/<config>/<split>-00000-of-0000N.parquet    Parquet shards, images embedded as {"bytes", "path"} structs

so that ``datasets.load_dataset(DIR, "<config>", split="<split>")`` works and ``push_to_hub`` keeps the layout.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from datasets import Features, Image, List, Value

__all__ = [
    "CONFIG_NAMES",
    "SPLITS",
    "BBOX_FEATURE",
    "OBJECT_FEATURE",
    "PRETRAIN_FEATURES",
    "RETRIEVAL_FEATURES",
    "GROUNDING_FEATURES",
    "OPTIONAL_FEATURES",
    "NLVR2_FEATURES",
    "VQA_FEATURES",
    "VQA_ANSWERS_FEATURES",
    "IMAGE_COLUMNS",
    "SchemaMismatchError",
    "get_features",
    "feature_mismatches",
    "check_features",
    "validate_record",
    "as_text_list",
    "clip_bbox",
    "candidate_boxes_problems",
    "DatasetFolderWriter",
    "write_dataset_card",
]

#: The standard split names written by the generator and the converter.
SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: ``[x, y, w, h]`` in pixels of the stored image, top-left corner plus size (COCO / official convention).
BBOX_FEATURE = List(Value("float32"), length=4)

#: One object / region of an image (the official ``elems`` entry).
OBJECT_FEATURE = {
    "bbox": BBOX_FEATURE,
    "captions": List(Value("string")),
    "attributes": List(Value("string")),
}

_COMMON = {
    "image": Image(),
    "image_id": Value("string"),
    "width": Value("int32"),
    "height": Value("int32"),
}

PRETRAIN_FEATURES = Features(
    {
        **_COMMON,
        "captions": List(Value("string")),
        "objects": List(OBJECT_FEATURE),
        "group": Value("string"),
    }
)

RETRIEVAL_FEATURES = Features(
    {
        **_COMMON,
        "captions": List(Value("string")),
        "group": Value("string"),
    }
)

GROUNDING_FEATURES = Features(
    {
        **_COMMON,
        "text": Value("string"),
        "bbox": BBOX_FEATURE,
        "ref_id": Value("int64"),
        "group": Value("string"),
    }
)

NLVR2_FEATURES = Features(
    {
        "identifier": Value("string"),
        "left_image": Image(),
        "right_image": Image(),
        "sentence": Value("string"),
        "label": Value("int64"),
    }
)

VQA_FEATURES = Features(
    {
        "question_id": Value("int64"),
        "image": Image(),
        "image_id": Value("string"),
        "question": Value("string"),
        "answers": List(Value("string")),
        "source": Value("string"),
        "group": Value("string"),
    }
)

VQA_ANSWERS_FEATURES = Features({"answer": Value("string")})

#: Optional columns of a configuration: a folder may lack them; when present they have this type. ``grounding``:
#: ``candidate_boxes``, the pixel ``[x, y, w, h]`` detections ranked by Grad-CAM grounding (official ``dets.json``),
#: in float64 as the official JSON numbers, since the box score slices the map at ``int(y + h)``, ``int(x + w)``.
OPTIONAL_FEATURES: dict[str, dict[str, Any]] = {
    "grounding": {"candidate_boxes": List(List(Value("float64"), length=4))}
}

_FEATURES: dict[str, Features] = {
    "pretrain": PRETRAIN_FEATURES,
    "retrieval": RETRIEVAL_FEATURES,
    "grounding": GROUNDING_FEATURES,
    "nlvr2": NLVR2_FEATURES,
    "vqa": VQA_FEATURES,
    "vqa_answers": VQA_ANSWERS_FEATURES,
}

#: The image columns of each configuration.
IMAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    name: tuple(k for k, v in features.items() if isinstance(v, Image)) for name, features in _FEATURES.items()
}

#: The configuration (subset) names of an X-VLM dataset folder.
CONFIG_NAMES: tuple[str, ...] = tuple(_FEATURES)


class SchemaMismatchError(ValueError):
    """A dataset does not have the features that an X-VLM configuration requires."""


def _schema(config_name: str) -> Features:
    """The shared (not to be modified) ``Features`` of ``config_name``; ``KeyError`` naming the known ones."""
    if config_name not in _FEATURES:
        raise KeyError(f"Unknown X-VLM dataset configuration {config_name!r}; expected one of {list(CONFIG_NAMES)}.")
    return _FEATURES[config_name]


def get_features(config_name: str, optional: Iterable[str] = ()) -> Features:
    """Return the ``datasets.Features`` of configuration ``config_name`` (a fresh copy), with the ``optional``
    columns named (:data:`OPTIONAL_FEATURES`) appended."""
    features = _schema(config_name).copy()
    known = OPTIONAL_FEATURES.get(config_name, {})
    for name in optional:
        if name not in known:
            raise KeyError(f"{name!r} is no optional column of {config_name!r}; expected one of {sorted(known)}.")
        features[name] = known[name]
    return features


def _describe(feature: Any) -> str:
    if isinstance(feature, Image):
        return "Image()"
    if isinstance(feature, Value):
        return f"Value({feature.dtype!r})"
    if isinstance(feature, List):
        length = "" if feature.length == -1 else f", length={feature.length}"
        return f"List({_describe(feature.feature)}{length})"
    if isinstance(feature, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in feature.items()) + "}"
    return repr(feature)


def _same(actual: Any, expected: Any) -> bool:
    """Structural equality of two feature types; an Image's ``decode``/``mode`` flags are ignored."""
    if isinstance(expected, Image):
        return isinstance(actual, Image)
    if isinstance(expected, Value):
        return isinstance(actual, Value) and actual.dtype == expected.dtype
    if isinstance(expected, List):
        return (
            isinstance(actual, List)
            and actual.length == expected.length
            and _same(actual.feature, expected.feature)
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and set(actual) == set(expected)
            and all(_same(actual[k], v) for k, v in expected.items())
        )
    return actual == expected


def feature_mismatches(features: Mapping[str, Any], config_name: str) -> list[str]:
    """List, in words, how ``features`` differ from those of ``config_name`` (empty when they match).

    Extra columns are allowed (a user may add their own); missing columns and columns of another type are reported.
    """
    optional = [name for name in OPTIONAL_FEATURES.get(config_name, {}) if name in features]
    expected = get_features(config_name, optional)
    problems: list[str] = []
    for name, feature in expected.items():
        if name not in features:
            problems.append(f"missing column {name!r} (expected {_describe(feature)})")
        elif not _same(features[name], feature):
            problems.append(
                f"column {name!r} is {_describe(features[name])}, expected {_describe(feature)}"
            )
    return problems


def check_features(features: Mapping[str, Any] | None, config_name: str, *, where: str = "dataset") -> None:
    """Raise :class:`SchemaMismatchError` with every problem listed unless ``features`` match ``config_name``."""
    if features is None:
        raise SchemaMismatchError(f"{where} has no declared features; expected the X-VLM {config_name!r} schema.")
    problems = feature_mismatches(features, config_name)
    if problems:
        raise SchemaMismatchError(
            f"{where} does not follow the X-VLM {config_name!r} schema (see docs/data.md):\n  - "
            + "\n  - ".join(problems)
        )


def as_text_list(value: str | Sequence[str] | None) -> list[str]:
    """Normalise an official ``str | [str]`` text field to a list of strings (``None`` -> ``[]``)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"expected a string or a list of strings, got {value!r}")


def clip_bbox(bbox: Sequence[float], width: int, height: int) -> list[float] | None:
    """Clip an ``[x, y, w, h]`` box to a ``width`` x ``height`` image; ``None`` if nothing of positive area remains."""
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1 - x0, y1 - y0]


def _bbox_problems(bbox: Any, width: int | None, height: int | None, what: str) -> list[str]:
    if not isinstance(bbox, Sequence) or len(bbox) != 4:
        return [f"{what} must be [x, y, w, h], got {bbox!r}"]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return [f"{what} has a non-numeric value: {bbox!r}"]
    x, y, w, h = bbox
    problems = []
    if w <= 0 or h <= 0:
        problems.append(f"{what} has a non-positive size: {list(bbox)}")
    tolerance = 1e-3
    if width is not None and height is not None and (
        x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance
    ):
        problems.append(f"{what} {list(bbox)} is not inside the {width}x{height} image")
    return problems


def validate_record(record: Mapping[str, Any], config_name: str) -> list[str]:
    """Check the *values* of one (not yet encoded) record of ``config_name``; return the problems found.

    Checks that every column is present, that texts are non-empty strings, and that boxes are ``[x, y, w, h]`` with a
    positive size inside the ``width`` x ``height`` image. ``nlvr2`` rows: a non-empty ``identifier`` and
    ``sentence``, both images given, ``label`` ``0`` or ``1`` (an ``int``, not a string or a bool). ``vqa`` rows: an
    integer ``question_id``, a non-empty ``image_id`` and ``question``, ``answers`` a list of strings (may be empty),
    ``source`` and ``group`` strings. ``vqa_answers`` rows: a non-empty ``answer``.
    """
    # the column names only: no copy of the schema per record (the converter validates every record)
    problems = [f"missing field {name!r}" for name in _schema(config_name) if name not in record]
    if problems:
        return problems
    if config_name == "nlvr2":
        return _nlvr2_problems(record)
    if config_name == "vqa":
        return _vqa_problems(record)
    if config_name == "vqa_answers":
        answer = record["answer"]
        return [] if isinstance(answer, str) and answer.strip() else [
            f"answer must be a non-empty string, got {answer!r}"
        ]
    width, height = record["width"], record["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        problems.append(f"width/height must be positive integers, got {width!r} x {height!r}")
        width = height = None
    if not isinstance(record["image_id"], str) or not record["image_id"]:
        problems.append(f"image_id must be a non-empty string, got {record['image_id']!r}")
    if config_name in ("pretrain", "retrieval"):
        captions = record["captions"]
        if not isinstance(captions, list) or not all(isinstance(c, str) and c.strip() for c in captions):
            problems.append(f"captions must be a list of non-empty strings, got {captions!r}")
    if config_name == "retrieval" and not record["captions"]:
        problems.append("a retrieval row needs at least one caption")
    if config_name == "pretrain":
        if not record["captions"] and not record["objects"]:
            problems.append("a pretrain row needs a caption or at least one object")
        for i, obj in enumerate(record["objects"]):
            missing = {"bbox", "captions", "attributes"} - set(obj)
            if missing:
                problems.append(f"objects[{i}] misses {sorted(missing)}")
                continue
            problems += _bbox_problems(obj["bbox"], width, height, f"objects[{i}].bbox")
            if not obj["captions"] or not all(isinstance(c, str) and c.strip() for c in obj["captions"]):
                problems.append(f"objects[{i}].captions must be a non-empty list of non-empty strings")
            if not all(isinstance(a, str) and a.strip() for a in obj["attributes"]):
                problems.append(f"objects[{i}].attributes must be a list of non-empty strings")
    if config_name == "grounding":
        if not isinstance(record["text"], str) or not record["text"].strip():
            problems.append(f"text must be a non-empty string, got {record['text']!r}")
        problems += _bbox_problems(record["bbox"], width, height, "bbox")
        if not isinstance(record["ref_id"], int):
            problems.append(f"ref_id must be an integer, got {record['ref_id']!r}")
        problems += candidate_boxes_problems(record.get("candidate_boxes", []))
    return problems


def candidate_boxes_problems(boxes: Any) -> list[str]:
    """Candidate boxes: ``[x, y, w, h]`` with a positive size and ``x, y >= 0`` (the official score slices the map
    from ``int(y)``, ``int(x)``); unlike ``bbox`` they may extend past the image (the official score keeps the full
    area), so they are stored unclipped."""
    if not isinstance(boxes, Sequence) or isinstance(boxes, str):
        return [f"candidate_boxes must be a list of [x, y, w, h] boxes, got {boxes!r}"]
    problems = []
    for i, box in enumerate(boxes):
        found = _bbox_problems(box, None, None, f"candidate_boxes[{i}]")
        if not found and (box[0] < 0 or box[1] < 0):
            found = [f"candidate_boxes[{i}] {list(box)} starts at a negative coordinate"]
        problems += found
    return problems


def _nlvr2_problems(record: Mapping[str, Any]) -> list[str]:
    problems = []
    if not isinstance(record["identifier"], str) or not record["identifier"]:
        problems.append(f"identifier must be a non-empty string, got {record['identifier']!r}")
    if not isinstance(record["sentence"], str) or not record["sentence"].strip():
        problems.append(f"sentence must be a non-empty string, got {record['sentence']!r}")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, int) or label not in (0, 1):
        problems.append(f"label must be the integer 1 (true) or 0 (false), got {label!r}")
    for name in ("left_image", "right_image"):
        if record[name] is None:
            problems.append(f"{name} is missing (None)")
    return problems


def _vqa_problems(record: Mapping[str, Any]) -> list[str]:
    problems = []
    question_id = record["question_id"]
    if isinstance(question_id, bool) or not isinstance(question_id, int):
        problems.append(f"question_id must be an integer, got {question_id!r}")
    if record["image"] is None:
        problems.append("image is missing (None)")
    if not isinstance(record["image_id"], str) or not record["image_id"]:
        problems.append(f"image_id must be a non-empty string, got {record['image_id']!r}")
    if not isinstance(record["question"], str) or not record["question"].strip():
        problems.append(f"question must be a non-empty string, got {record['question']!r}")
    answers = record["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        problems.append(f"answers must be a list of strings, got {answers!r}")
    for name in ("source", "group"):
        if not isinstance(record[name], str):
            problems.append(f"{name} must be a string, got {record[name]!r}")
    return problems


# --------------------------------------------------------------------------------------------------------------------
# Writing the folder layout
# --------------------------------------------------------------------------------------------------------------------


class _ShardedParquetWriter:
    """Streams encoded rows of one (config, split) into Parquet shards of bounded size."""

    def __init__(self, directory: Path, split: str, features: Features, max_shard_bytes: int, row_group_size: int):
        self.directory = directory
        self.split = split
        self.features = features
        self.schema = features.arrow_schema
        self.max_shard_bytes = max_shard_bytes
        self.row_group_size = row_group_size
        self.shards: list[Path] = []
        self.num_rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_bytes = 0

    def add(self, encoded: dict[str, Any], approx_bytes: int) -> None:
        self._buffer.append(encoded)
        self._buffer_bytes += approx_bytes
        self.num_rows += 1
        if len(self._buffer) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is not None and self._shard_bytes + self._buffer_bytes > self.max_shard_bytes:
            self._writer.close()
            self._writer = None
        if self._writer is None:
            path = self.directory / f"{self.split}-{len(self.shards):05d}.parquet.partial"
            self.directory.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(path, self.schema)
            self.shards.append(path)
            self._shard_bytes = 0
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        self._writer.write_table(table, row_group_size=len(self._buffer))
        self._shard_bytes += self._buffer_bytes
        self._buffer, self._buffer_bytes = [], 0

    def close(self) -> list[str]:
        """Finish the last shard and rename every shard to ``<split>-0000i-of-0000N.parquet``."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        final = []
        for i, path in enumerate(self.shards):
            target = self.directory / f"{self.split}-{i:05d}-of-{len(self.shards):05d}.parquet"
            os.replace(path, target)
            final.append(target.name)
        return final


def _approx_size(record: Mapping[str, Any]) -> int:
    size = 256
    for name in ("image", "left_image", "right_image"):
        image = record.get(name)
        if isinstance(image, Mapping) and isinstance(image.get("bytes"), (bytes, bytearray)):
            size += len(image["bytes"])
    return size


class DatasetFolderWriter:
    """Write X-VLM records into a Hub-format dataset folder (Parquet shards per config/split and a dataset card).

    Usage::

        with DatasetFolderWriter(out_dir, pretty_name="...") as writer:
            writer.add("retrieval", "test", {"image": {"bytes": png, "path": None}, "image_id": "0", ...})

    Records are validated (:func:`validate_record`) and encoded with the configuration's ``Features``. ``image`` may be
    ``{"bytes": ..., "path": ...}`` (embedded as is), a ``PIL.Image.Image`` (encoded by ``datasets``) or raw bytes.
    On :meth:`close` the shards get their final names and ``README.md`` is written with the ``configs:`` block.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        overwrite: bool = False,
        max_shard_bytes: int = 500 * 1024 * 1024,
        row_group_size: int = 100,
        pretty_name: str = "X-VLM dataset",
        card_body: str = "",
        card_metadata: Mapping[str, Any] | None = None,
        validate: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{self.out_dir} exists and is not empty; pass overwrite=True (--overwrite).")
            for config in CONFIG_NAMES:
                shutil.rmtree(self.out_dir / config, ignore_errors=True)
            (self.out_dir / "README.md").unlink(missing_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.row_group_size = row_group_size
        self.pretty_name = pretty_name
        self.card_body = card_body
        self.card_metadata = dict(card_metadata or {})
        self.validate = validate
        self._writers: dict[tuple[str, str], _ShardedParquetWriter] = {}
        self._optional: dict[str, list[str]] = {}
        self.files: dict[str, dict[str, list[str]]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self._closed = False

    def add(self, config_name: str, split: str, record: Mapping[str, Any]) -> None:
        """Validate, encode and append one record to ``config_name``/``split``."""
        if self._closed:
            raise RuntimeError("this DatasetFolderWriter is closed")
        if self.validate:
            problems = validate_record(record, config_name)
            if problems:
                name = next((record[k] for k in ("question_id", "image_id", "identifier", "answer") if k in record),
                            None)
                raise ValueError(f"invalid {config_name!r} record {name!r}: " + "; ".join(problems))
        key = (config_name, split)
        # One schema per configuration (`load_dataset` reads every split with one): the config's first record
        # decides its optional columns; a later record without one gets it empty, one that brings a new one fails.
        optional = [name for name in OPTIONAL_FEATURES.get(config_name, {}) if name in record]
        expected = self._optional.setdefault(config_name, optional)
        if set(optional) - set(expected):
            raise ValueError(
                f"{config_name!r}: optional columns {expected} in the first record but {optional} in this one "
                f"({split}); give a column in the first record of a configuration (empty if need be) or in none."
            )
        if key not in self._writers:
            self._writers[key] = _ShardedParquetWriter(
                self.out_dir / config_name, split, get_features(config_name, expected), self.max_shard_bytes,
                self.row_group_size,
            )
        writer = self._writers[key]
        row = {**{name: [] for name in expected}, **record}
        for name in IMAGE_COLUMNS.get(config_name, ()):
            if isinstance(row.get(name), (bytes, bytearray)):
                row[name] = {"bytes": bytes(row[name]), "path": None}
        encoded = writer.features.encode_example({name: row[name] for name in writer.features})
        for name in IMAGE_COLUMNS.get(config_name, ()):
            value = row.get(name)
            if isinstance(value, Mapping) and value.get("bytes") is not None:
                # datasets.Image drops the bytes when `path` names a local file: keep the image embedded
                encoded[name] = {"bytes": bytes(value["bytes"]), "path": value.get("path")}
        writer.add(encoded, _approx_size(encoded))

    def close(self) -> dict[str, dict[str, int]]:
        """Finalise every shard, write ``README.md`` and return ``{config: {split: num_rows}}``."""
        if self._closed:
            return self.counts
        for (config, split), writer in sorted(self._writers.items(), key=lambda kv: _split_order(kv[0])):
            self.files.setdefault(config, {})[split] = writer.close()
            self.counts.setdefault(config, {})[split] = writer.num_rows
        sizes = {
            config: {split: sum((self.out_dir / config / n).stat().st_size for n in names)
                     for split, names in splits.items()}
            for config, splits in self.files.items()
        }
        write_dataset_card(
            self.out_dir, self.counts, pretty_name=self.pretty_name, body=self.card_body,
            metadata=self.card_metadata, parquet_sizes=sizes,
        )
        self._closed = True
        return self.counts

    def __enter__(self) -> DatasetFolderWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written dataset that looks complete
            for writer in self._writers.values():
                if writer._writer is not None:
                    writer._writer.close()


def _split_order(key: tuple[str, str]) -> tuple[int, int, str]:
    config, split = key
    c = CONFIG_NAMES.index(config) if config in CONFIG_NAMES else len(CONFIG_NAMES)
    s = SPLITS.index(split) if split in SPLITS else len(SPLITS)
    return c, s, split


def _schema_markdown() -> str:
    lines = []
    for config in CONFIG_NAMES:
        line = f"- `{config}`: " + ", ".join(f"`{k}`: {_describe(v)}" for k, v in get_features(config).items())
        optional = OPTIONAL_FEATURES.get(config, {})
        if optional:
            line += "; optional " + ", ".join(f"`{k}`: {_describe(v)}" for k, v in optional.items())
        lines.append(line)
    return "\n".join(lines)


def write_dataset_card(
    out_dir: str | os.PathLike,
    counts: Mapping[str, Mapping[str, int]],
    *,
    pretty_name: str = "X-VLM dataset",
    body: str = "",
    metadata: Mapping[str, Any] | None = None,
    parquet_sizes: Mapping[str, Mapping[str, int]] | None = None,
) -> Path:
    """Write ``out_dir/README.md``: YAML ``configs:`` (one per non-empty config, one data_files entry per split).

    A ``dataset_info`` block records the rows and Parquet bytes per split (``parquet_sizes``). Besides
    informing the Hub viewer, it changes ``datasets``' cache key when a folder is regenerated in place: for a local
    folder whose configs come from the card, ``load_dataset`` hashes the card, not the files' contents or times, and
    would otherwise serve the previous data from its cache.
    """
    out_dir = Path(out_dir)
    configs = []
    for config in CONFIG_NAMES:
        present = sorted(counts.get(config, {}), key=lambda s: _split_order((config, s)))
        splits = [s for s in present if counts[config][s]]
        if not splits:
            continue
        entry: dict[str, Any] = {
            "config_name": config,
            "data_files": [{"split": s, "path": f"{config}/{s}-*.parquet"} for s in splits],
        }
        if not configs:
            entry["default"] = True
        configs.append(entry)
    infos = []
    for entry in configs:
        name = entry["config_name"]
        sizes = (parquet_sizes or {}).get(name, {})
        splits = [
            {"name": s, "num_bytes": int(sizes.get(s, 0)), "num_examples": int(counts[name][s])}
            for s in (d["split"] for d in entry["data_files"])
        ]
        infos.append({"config_name": name, "splits": splits, "download_size": sum(s["num_bytes"] for s in splits)})
    meta: dict[str, Any] = {"pretty_name": pretty_name, "tags": ["x-vlm"], **dict(metadata or {}), "configs": configs,
                            "dataset_info": infos}
    table = ["| config | split | rows |", "|---|---|---|"]
    for entry in configs:
        for split_entry in entry["data_files"]:
            name, split = entry["config_name"], split_entry["split"]
            table.append(f"| {name} | {split} | {counts[name][split]} |")
    first = configs[0]["config_name"] if configs else "pretrain"
    first_split = configs[0]["data_files"][0]["split"] if configs else "train"
    text = (
        "---\n"
        + yaml.safe_dump(meta, sort_keys=False)
        + "---\n\n"
        + f"# {pretty_name}\n\n"
        + (body.strip() + "\n\n" if body.strip() else "")
        + "## Contents\n\n"
        + "\n".join(table)
        + "\n\n## Schema (X-VLM dataset layout, see `docs/data.md` of `modeling_xvlm`)\n\n"
        + _schema_markdown()
        + "\n\nBoxes are `[x, y, w, h]` in pixels of the stored image (top-left corner and size). "
        + "`nlvr2` `label`: 1 = the sentence is true of the (left, right) image pair, 0 = false. "
        + "`vqa` `answers`: the annotators' answers (repetitions kept); `vqa_answers`: the candidate answers of the "
        + "ranking evaluation.\n\n"
        + "## Usage\n\n```python\nimport datasets\n"
        + f'ds = datasets.load_dataset("path/or/hub-id", "{first}", split="{first_split}")\n```\n\n'
        + "Upload the folder as is (`huggingface-cli upload <user>/<name> . --repo-type dataset`) or push each\n"
        + "configuration with `datasets.load_dataset(DIR, name).push_to_hub(<repo>, config_name=name)`.\n"
    )
    path = out_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def read_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:  # pragma: no cover - debugging aid
    """Read raw (encoded) rows of Parquet shards without ``datasets`` (images stay ``{"bytes", "path"}``)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows += pq.read_table(path).to_pylist()
    return rows


def _json_default(value: Any) -> Any:  # pragma: no cover - trivial
    if isinstance(value, Path):
        return str(value)
    raise TypeError(repr(value))


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON (a helper shared by the generator and the converter)."""
    with io.open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
