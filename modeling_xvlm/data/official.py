"""Convert the official X-VLM JSON files plus an image root into a Hub-format X-VLM dataset folder.

Inputs (official formats, see docs/data.md):

* pre-training image-text JSON lines ``{"caption": str | [str], "binary": <base64> | "image_rpath": path}``;
* pre-training region/object JSON lines ``{"elems": [{"caption", "bb": [x, y, w, h], "attributes"?}], "caption"?,
  "binary" | "image_rpath"}``;
* retrieval lists: train ``[{"image", "caption": str, "image_id"}]`` (grouped into one row per image), val/test
  ``[{"image", "caption": [str]}]``;
* RefCOCO+ lists ``[{"image", "text", "ref_id"}]`` whose boxes come from ``refs(unc).p`` + ``instances.json`` (or
  records that carry ``bbox`` themselves, as the VLUE files do), and optionally the detections of weakly supervised
  grounding, ``refcoco+/dets.json`` ``{image_id: [[x, y, w, h, ...], ...]}`` (or ``dets`` in each VLUE record),
  which become the rows' ``candidate_boxes``;
* NLVR2 lists ``[{"images": [left, right], "sentence", "label": "True" | "False", "identifier"?}]``
  (``nlvr_train.json``, ``nlvr_dev.json`` -> ``validation``, ``nlvr_test.json`` = test-P);
* VQA lists ``[{"image", "question", "answer": [str] (vqa) | str (vg), "dataset"?: "vqa" | "vg" | "gqa",
  "question_id"?}]`` (``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``, test ``vqa_test.json`` without answers)
  and the candidate answers ``answer_list.json`` (a JSON list of strings);
* COCO Karpathy captioning lists (official ``dataset/coco_karpathy_dataset.py``): train
  ``[{"image", "caption": str, "image_id": "coco_<id>"}]``, val/test ``[{"image", "caption": [str]}]`` (the
  ``retrieval`` formats: they become ``retrieval`` rows) and the ground truth ``coco_karpathy_{val,test}_gt.json``
  (COCO caption format ``{"annotations": [{"image_id": int, "caption": str}]}``), whose captions become the
  references of the val/test rows.

Image paths are relative to their image root: a path that leaves it (absolute, or ``..`` above the root) is
refused (``outside_image_root``) unless ``allow_outside_root=True`` (``--allow-outside-image-root``), and then stored
by its file name only, so that no local path outside the root ends up in the dataset. Every per-image failure
(missing file, undecodable or truncated data, an image over PIL's decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``
-> ``image_too_large``) skips the record and is counted; the summary names the files.

Output: the layout of :mod:`modeling_xvlm.data.schemas` (``pretrain``/``retrieval``/``grounding``/``nlvr2``/``vqa``/
``vqa_answers`` configs), images embedded with their original bytes. Missing or unreadable images, malformed records and unusable
boxes are counted, skipped, and reported in :class:`ConversionSummary` (printed by the CLI and written to ``conversion_summary.json``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import re
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from .schemas import DatasetFolderWriter, as_text_list, candidate_boxes_problems, clip_bbox, write_json

__all__ = [
    "ConversionSummary",
    "convert_official",
    "load_refcoco_boxes",
    "load_refcoco_dets",
    "coco_image_id",
    "load_coco_caption_references",
    "SPLIT_ALIASES",
]

#: Official split names -> Hub split names.
SPLIT_ALIASES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation",
                 "dev": "validation", "test": "test"}
_SUMMARY_FILE = "conversion_summary.json"
_MAX_EXAMPLES = 20


@dataclass
class ConversionSummary:
    """What a conversion wrote and what it skipped (and why)."""

    written: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    missing_images: list[str] = field(default_factory=list)
    corrupt_images: list[str] = field(default_factory=list)
    oversized_images: list[str] = field(default_factory=list)
    outside_root_images: list[str] = field(default_factory=list)
    boxes_clipped: int = 0
    boxes_dropped: int = 0
    candidate_boxes_dropped: int = 0
    images_without_dets: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, config: str, split: str, reason: str, detail: str = "") -> None:
        self.skipped.setdefault(config, {}).setdefault(split, 0)
        self.skipped[config][split] += 1
        self.reasons[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if detail and len(examples) < _MAX_EXAMPLES:
            examples.append(detail)

    @property
    def num_written(self) -> int:
        return sum(n for splits in self.written.values() for n in splits.values())

    @property
    def num_skipped(self) -> int:
        return sum(n for splits in self.skipped.values() for n in splits.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "skipped": self.skipped,
            "num_written": self.num_written,
            "num_skipped": self.num_skipped,
            "skip_reasons": dict(self.reasons),
            "missing_images": len(self.missing_images),
            "corrupt_images": len(self.corrupt_images),
            "oversized_images": len(self.oversized_images),
            "outside_root_images": len(self.outside_root_images),
            "missing_image_examples": self.missing_images[:_MAX_EXAMPLES],
            "corrupt_image_examples": self.corrupt_images[:_MAX_EXAMPLES],
            "oversized_image_examples": self.oversized_images[:_MAX_EXAMPLES],
            "outside_root_image_examples": self.outside_root_images[:_MAX_EXAMPLES],
            "boxes_clipped": self.boxes_clipped,
            "boxes_dropped": self.boxes_dropped,
            "candidate_boxes_dropped": self.candidate_boxes_dropped,
            "images_without_dets": self.images_without_dets,
            "examples": self.examples,
        }

    def format(self) -> str:
        """A short human-readable report."""
        lines = ["Conversion summary:"]
        for config, splits in self.written.items():
            for split, n in splits.items():
                skipped = self.skipped.get(config, {}).get(split, 0)
                lines.append(f"  {config}/{split}: {n} rows written, {skipped} skipped")
        for config, splits in self.skipped.items():
            for split, n in splits.items():
                if split not in self.written.get(config, {}):
                    lines.append(f"  {config}/{split}: 0 rows written, {n} skipped")
        lines.append(f"  missing images: {len(self.missing_images)}; corrupt images: {len(self.corrupt_images)}")
        for path in self.missing_images[:5]:
            lines.append(f"    missing: {path}")
        for path in self.corrupt_images[:5]:
            lines.append(f"    corrupt: {path}")
        if self.oversized_images or self.outside_root_images:
            lines.append(f"  images over the decompression-bomb limit: {len(self.oversized_images)}; paths outside "
                         f"the image root (refused): {len(self.outside_root_images)}")
        for path in self.oversized_images[:5]:
            lines.append(f"    too large: {path}")
        for path in self.outside_root_images[:5]:
            lines.append(f"    outside the image root: {path}")
        if self.reasons:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items()))
            lines.append(f"  skipped records by reason: {reasons}")
        lines.append(f"  boxes clipped to the image: {self.boxes_clipped}; boxes dropped: {self.boxes_dropped}")
        if self.candidate_boxes_dropped or self.images_without_dets:
            lines.append(f"  candidate boxes dropped (per row): {self.candidate_boxes_dropped}; rows whose image has "
                         f"no detections: {self.images_without_dets}")
        return "\n".join(lines)


def _escapes_root(relpath: str) -> bool:
    """Whether an annotation's image path leaves its image root: absolute, or ``..`` above it (lexically)."""
    if os.path.isabs(relpath):
        return True
    norm = os.path.normpath(relpath)
    return norm == os.pardir or norm.startswith(os.pardir + os.sep)


class _ImageReader:
    """Reads and verifies images once per path; remembers failures; keeps a few recent images in memory.

    Every failure of one image (unreadable, undecodable, over the decompression-bomb limit, outside the image root)
    is a reason string for the caller to skip and count, never an exception."""

    def __init__(self, summary: ConversionSummary, verify: bool, cache_size: int = 64,
                 allow_outside_root: bool = False) -> None:
        self.summary = summary
        self.verify = verify
        self.allow_outside_root = allow_outside_root
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[bytes, int, int]] = OrderedDict()
        self._failed: dict[str, str] = {}

    def _decode(self, data: bytes) -> tuple[int, int]:
        with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS and raises above twice that
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if self.verify:
                    image.load()  # a full decode: truncated files fail here
                return image.size

    def _decode_failure(self, error: Exception, display: str) -> str:
        """Record why an image could not be decoded; the skip reason."""
        if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            self.summary.oversized_images.append(f"{display} ({error})")
            return "image_too_large"
        self.summary.corrupt_images.append(f"{display} ({type(error).__name__}: {error})")
        return "corrupt_image"

    def read_path(self, root: Path, relpath: str) -> tuple[dict[str, Any], int, int] | str:
        """``({"bytes", "path"}, width, height)`` of ``root / relpath``, or the failure reason ``"missing_image"`` /
        ``"corrupt_image"`` / ``"image_too_large"`` / ``"outside_image_root"``. ``path`` is ``relpath`` as given,
        or only the file name for a path outside ``root`` (allowed with ``allow_outside_root``)."""
        display = relpath
        if _escapes_root(relpath):
            if not self.allow_outside_root:
                self.summary.outside_root_images.append(relpath)
                return "outside_image_root"
            display = Path(relpath).name  # never store a local path outside the root
        path = root / relpath  # an absolute relpath replaces root
        key = str(path)
        if key in self._failed:
            return self._failed[key]
        if key in self._cache:
            self._cache.move_to_end(key)
            data, width, height = self._cache[key]
            return {"bytes": data, "path": display}, width, height
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            self._failed[key] = "missing_image"
            self.summary.missing_images.append(display)
            return "missing_image"
        try:
            width, height = self._decode(data)
        except Exception as error:  # noqa: BLE001 - any failure of one image skips that image only
            self._failed[key] = self._decode_failure(error, display)
            return self._failed[key]
        self._cache[key] = (data, width, height)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return {"bytes": data, "path": display}, width, height

    def read_base64(self, text: str, display: str) -> tuple[dict[str, Any], int, int] | str:
        try:
            data = base64.b64decode(text, validate=False)
            width, height = self._decode(data)
        except Exception as error:  # noqa: BLE001 - any failure of one image skips that image only
            return self._decode_failure(error, display)
        return {"bytes": data, "path": None}, width, height


def _iter_json_lines(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, int, str]]:
    """Yield ``(file name, line number, line)`` for every non-empty line of the files / directories' files."""
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.is_file() and not p.name.startswith("."))
        elif entry.is_file():
            files = [entry]
        else:
            raise FileNotFoundError(f"no such pre-training file or directory: {entry}")
        for file in files:
            with open(file, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield file.name, number, line


def _load_json_list(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle that names a class or function (code to run), refused by `_PlainDataUnpickler`."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers and scalars: any global (class or function) lookup is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise _RefusedGlobal(
            f"refusing to load {module}.{name} from a RefCOCO refs pickle: only plain lists, dicts, strings and "
            "numbers are allowed"
        )


def load_refcoco_boxes(refs_path: str | os.PathLike, instances_path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Map ``ref_id`` -> ``{"bbox": [x, y, w, h], "split": str}`` from ``refs(unc).p`` and ``instances.json``.

    This is what the official code reads through ``REFER`` (``refToAnn[ref_id]['bbox']``, ``Refs[ref_id]['split']``).
    ``refs(unc).p`` is a pickle of plain lists and dicts; it is read with an unpickler that refuses every class and
    function (see `_PlainDataUnpickler`), so a tampered file raises instead of running code.

    Raises:
        pickle.UnpicklingError: the refs pickle names a class or function (refused, never run).
        ValueError: a refs file that is no readable pickle (random bytes, truncated, empty), or files whose contents are not the RefCOCO structures (naming the file).
    """
    try:
        with open(refs_path, "rb") as f:
            refs = _PlainDataUnpickler(f).load()
    except _RefusedGlobal:
        raise
    except Exception as error:  # noqa: BLE001 - random bytes fail in many ways (e.g. OverflowError on BINBYTES)
        raise ValueError(f"{refs_path}: not a readable RefCOCO refs pickle ({type(error).__name__}: {error})") from None
    with open(instances_path, encoding="utf-8") as f:
        instances = json.load(f)
    try:
        boxes = {int(a["id"]): a["bbox"] for a in instances.get("annotations", [])}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{instances_path}: expected COCO instances {{'annotations': [{{'id', 'bbox'}}]}} "
                         f"({type(error).__name__}: {error})") from None
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of RefCOCO refs, got {type(refs).__name__}")
    out: dict[int, dict[str, Any]] = {}
    for i, ref in enumerate(refs):
        try:
            ann_id = int(ref["ann_id"])
            if ann_id in boxes:
                out[int(ref["ref_id"])] = {"bbox": [float(v) for v in boxes[ann_id]],
                                           "split": str(ref.get("split", "")), "image_id": ref.get("image_id")}
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{refs_path}: ref {i} is not a RefCOCO ref with ann_id / ref_id "
                             f"({type(error).__name__}: {error})") from None
    return out


def load_refcoco_dets(path: str | os.PathLike) -> dict[str, list[list[float]]]:
    """Read the official ``refcoco+/dets.json`` (``{image_id: [[x, y, w, h, ...], ...]}``, pixel boxes of a detector
    that weakly supervised grounding ranks, ``Grounding.py`` / ``grounding_eval``): image id (a string, as the
    official ``dets[str(image_id)]``) -> the boxes' first four numbers.

    Raises:
        ValueError: a file that is not such a mapping (naming the file and the entry).
    """
    with open(path, encoding="utf-8") as f:
        try:
            dets = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(dets, dict):
        raise ValueError(f"{path}: expected a JSON object {{image_id: [[x, y, w, h, ...], ...]}}, "
                         f"got {type(dets).__name__}")
    out = {}
    for image_id, boxes in dets.items():
        if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) >= 4 for b in boxes):
            raise ValueError(f"{path}: entry {image_id!r} is not a list of [x, y, w, h, ...] detections")
        out[str(image_id)] = [b[:4] for b in boxes]
    return out


def _candidate_boxes(dets: Any, summary: ConversionSummary) -> list[list[float]]:
    """Detections -> candidate boxes, kept unclipped (the official score uses the full area); a box that cannot be
    scored (not four finite numbers, a non-positive size, a negative start) is dropped and counted."""
    kept = []
    for det in dets if isinstance(dets, list) else []:
        try:
            box = [float(v) for v in det[:4]]
        except (TypeError, ValueError):
            box = None
        if box is None or candidate_boxes_problems([box]):
            summary.candidate_boxes_dropped += 1
            continue
        kept.append(box)
    return kept


def _has_dets(path: str | os.PathLike) -> bool:
    """Whether a grounding file's records carry their own detections (the VLUE files' ``dets``)."""
    try:
        records = _load_json_list(path)
    except ValueError:
        return False  # reported when its rows are read
    return any(isinstance(r, dict) and "dets" in r for r in records)


def _dets_image_id(ref: Mapping[str, Any] | None, record: Mapping[str, Any], rel: str) -> str | None:
    """The COCO image id that keys ``dets.json``: the ref's (official ``refer.Refs[ref_id]['image_id']``), else the
    record's ``image_id``, else the number at the end of the file name."""
    if ref and ref.get("image_id") is not None:
        return str(ref["image_id"])
    if record.get("image_id") is not None:
        return str(record["image_id"])
    try:
        return str(coco_image_id(rel))
    except ValueError:
        return None


def _checked_box(bbox: Any, width: int, height: int, summary: ConversionSummary) -> list[float] | None:
    if not isinstance(bbox, Sequence) or isinstance(bbox, str) or len(bbox) != 4:
        summary.boxes_dropped += 1
        return None
    try:
        box = [float(v) for v in bbox]
    except (TypeError, ValueError):
        summary.boxes_dropped += 1
        return None
    clipped = clip_bbox(box, width, height)
    if clipped is None:
        summary.boxes_dropped += 1
        return None
    if any(abs(a - b) > 1e-3 for a, b in zip(clipped, box)):
        summary.boxes_clipped += 1
    return clipped


def _pretrain_rows(
    paths: Sequence[str | os.PathLike],
    kind: str,
    root: Path,
    reader: _ImageReader,
    summary: ConversionSummary,
    image_key: str | None,
    caption_key: str,
    max_records: int | None,
) -> Iterator[dict[str, Any]]:
    count = 0
    for file_name, number, line in _iter_json_lines(paths):
        if max_records is not None and count >= max_records:
            return
        count += 1
        where = f"{file_name}:{number}"
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            captions = as_text_list(record.get(caption_key))
        except (ValueError, TypeError) as error:
            summary.skip("pretrain", "train", "invalid_record", f"{where}: {error}")
            continue
        captions = [c for c in captions if c.strip()]
        if "binary" in record and (image_key in (None, "binary")):
            image = reader.read_base64(record["binary"], where)
            image_id = str(record.get("image_id", where))
        else:
            keys = [image_key] if image_key else ["image_rpath", "image"]
            rel = next((record[k] for k in keys if k and isinstance(record.get(k), str)), None)
            if rel is None:
                summary.skip("pretrain", "train", "invalid_record", f"{where}: no image field ({keys})")
                continue
            image = reader.read_path(root, rel)
            image_id = str(record.get("image_id", image[0]["path"] if not isinstance(image, str) else ""))
        if isinstance(image, str):
            summary.skip("pretrain", "train", image, where)
            continue
        image_dict, width, height = image
        objects = []
        if kind == "regions":
            elems = record.get("elems")
            if not isinstance(elems, list):
                summary.skip("pretrain", "train", "invalid_record", f"{where}: `elems` is not a list")
                continue
            for elem in elems:
                try:
                    elem_captions = [c for c in as_text_list(elem.get("caption")) if c.strip()]
                    attributes = [a for a in as_text_list(elem.get("attributes")) if a.strip()]
                except (TypeError, AttributeError):
                    summary.boxes_dropped += 1
                    continue
                box = _checked_box(elem.get("bb"), width, height, summary)
                if box is None or not elem_captions:
                    if box is not None:
                        summary.boxes_dropped += 1
                    continue
                objects.append({"bbox": box, "captions": elem_captions, "attributes": attributes})
        if not captions and not objects:
            summary.skip("pretrain", "train", "no_text", where)
            continue
        yield {
            "image": image_dict, "image_id": image_id, "width": width, "height": height,
            "captions": captions, "objects": objects, "group": "regions" if kind == "regions" else "image_text",
        }


def _retrieval_rows(
    path: str | os.PathLike, split: str, root: Path, reader: _ImageReader, summary: ConversionSummary,
    max_records: int | None,
) -> Iterator[dict[str, Any]]:
    records = _load_json_list(path)[: max_records]
    grouped: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for i, record in enumerate(records):
        where = f"{Path(path).name}[{i}]"
        try:
            rel = record["image"]
            captions = [c for c in as_text_list(record.get("caption")) if c.strip()]
            if not isinstance(rel, str) or not captions:
                raise ValueError("needs `image` (str) and a non-empty `caption`")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            summary.skip("retrieval", split, "invalid_record", f"{where}: {error}")
            continue
        entry = grouped.setdefault(rel, {"image_id": record.get("image_id"), "captions": []})
        entry["captions"].extend(captions)
    for rel, entry in grouped.items():
        image = reader.read_path(root, rel)
        if isinstance(image, str):
            summary.skip("retrieval", split, image, rel)
            continue
        image_dict, width, height = image
        image_id = str(entry["image_id"]) if entry["image_id"] is not None else image_dict["path"]
        yield {"image": image_dict, "image_id": image_id, "width": width, "height": height,
               "captions": entry["captions"], "group": ""}


_IMAGE_SUFFIX = re.compile(r"\.(jpe?g|png|bmp|gif|webp)$", re.IGNORECASE)


def coco_image_id(image: str | int) -> int:
    """The numeric COCO image id of an image path or id, as the official captioning evaluation parses it
    (``coco_karpathy_caption_eval``: the last ``_``-separated field of the file name, extension removed).

    ``"val2014/COCO_val2014_000000391895.jpg"`` -> ``391895``; ``"coco_522418"`` (a Karpathy train ``image_id``)
    -> ``522418``; ``"391895"`` or ``391895`` -> ``391895``. Raises ValueError when the name ends in no number.
    """
    if isinstance(image, bool) or not isinstance(image, (int, str)):
        raise TypeError(f"expected an image path or id (str or int), got {type(image).__name__}: {image!r}")
    if isinstance(image, int):
        return image
    stem = _IMAGE_SUFFIX.sub("", image.replace("\\", "/").rsplit("/", 1)[-1])
    digits = stem.rsplit("_", 1)[-1]
    if not re.fullmatch(r"[0-9]+", digits):
        raise ValueError(
            f"no COCO image id in {image!r}: expected a file name ending in _<digits> (COCO_val2014_000000391895.jpg)"
        )
    return int(digits)


def load_coco_caption_references(path: str | os.PathLike) -> dict[int, list[str]]:
    """``{COCO image id: [captions]}`` of a COCO caption annotation file (``coco_karpathy_{val,test}_gt.json``, the
    references of the official ``coco_caption_eval``), captions raw and in file order."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f'{path}: expected COCO caption annotations {{"annotations": [{{"image_id", "caption"}}]}}')
    references: dict[int, list[str]] = {}
    for i, annotation in enumerate(annotations):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if isinstance(image_id, bool) or not isinstance(image_id, int) or not isinstance(caption, str):
            raise ValueError(f"{path}: annotations[{i}] needs an integer image_id and a caption string, "
                             f"got {annotation!r}")
        references.setdefault(image_id, []).append(caption)
    return references


def _captioning_rows(
    path: str | os.PathLike, split: str, root: Path, reader: _ImageReader, summary: ConversionSummary,
    max_records: int | None, references: Mapping[int, Sequence[str]] | None,
) -> Iterator[dict[str, Any]]:
    """COCO Karpathy captioning records as ``retrieval`` rows (the same formats). Validation/test rows need a COCO
    id in the image file name (the official evaluation parses it: ``invalid_record`` otherwise) and, given the
    ground truth ``references``, take its captions (``not_in_gt`` when it has none for the image)."""
    for row in _retrieval_rows(path, split, root, reader, summary, max_records):
        if split == "train":
            yield row
            continue
        rel = row["image"]["path"]
        try:
            image_id = coco_image_id(rel)
        except ValueError as error:
            summary.skip("retrieval", split, "invalid_record", str(error))
            continue
        if references is not None:
            captions = [c for c in references.get(image_id, ()) if c.strip()]
            if not captions:
                summary.skip("retrieval", split, "not_in_gt", f"{rel} (COCO id {image_id})")
                continue
            row = {**row, "captions": captions}
        yield row


def _grounding_rows(
    path: str | os.PathLike, split: str, root: Path, reader: _ImageReader, summary: ConversionSummary,
    boxes: Mapping[int, Mapping[str, Any]] | None, max_records: int | None,
    dets: Mapping[str, Sequence[Sequence[float]]] | None = None, with_candidates: bool = False,
) -> Iterator[dict[str, Any]]:
    """``with_candidates``: every row gets ``candidate_boxes`` (``[]`` when none is known), so that all splits of
    the ``grounding`` config share one schema."""
    records = _load_json_list(path)[: max_records]
    for i, record in enumerate(records):
        where = f"{Path(path).name}[{i}]"
        try:
            rel, text, ref_id = record["image"], record["text"], int(record["ref_id"])
            if not isinstance(rel, str) or not isinstance(text, str) or not text.strip():
                raise ValueError("needs `image` (str), `text` (non-empty str) and `ref_id` (int)")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            summary.skip("grounding", split, "invalid_record", f"{where}: {error}")
            continue
        ref = boxes.get(ref_id) if boxes is not None else None
        bbox = record.get("bbox", ref["bbox"] if ref else None)
        group = str(record.get("split", ref["split"] if ref else ""))
        if bbox is None:
            summary.skip("grounding", split, "no_bbox", f"{where}: ref_id {ref_id}")
            continue
        image = reader.read_path(root, rel)
        if isinstance(image, str):
            summary.skip("grounding", split, image, rel)
            continue
        image_dict, width, height = image
        box = _checked_box(bbox, width, height, summary)
        if box is None:
            summary.skip("grounding", split, "invalid_bbox", f"{where}: {bbox}")
            continue
        row = {"image": image_dict, "image_id": str(record.get("image_id", image_dict["path"])), "width": width,
               "height": height, "text": text, "bbox": box, "ref_id": ref_id, "group": group}
        if with_candidates:
            if "dets" in record:
                found = record["dets"]
            else:
                found = (dets or {}).get(_dets_image_id(ref, record, rel) or "")
                if found is None:
                    summary.images_without_dets += 1
            row["candidate_boxes"] = _candidate_boxes(found or [], summary)
        yield row


def _nlvr2_label(value: Any) -> int:
    """The official ``"True"`` / ``"False"`` (also booleans and 0/1) -> 1 / 0; anything else raises ValueError."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if isinstance(value, int) and value in (0, 1):
        return value
    raise ValueError(f"unsupported label {value!r} (expected \"True\" or \"False\")")


def _nlvr2_rows(
    path: str | os.PathLike, split: str, root: Path, reader: _ImageReader, summary: ConversionSummary,
    max_records: int | None,
) -> Iterator[dict[str, Any]]:
    records = _load_json_list(path)[: max_records]
    stem = Path(path).stem
    for i, record in enumerate(records):
        where = f"{Path(path).name}[{i}]"
        try:
            images, sentence = record["images"], record["sentence"]
            if (not isinstance(images, (list, tuple)) or len(images) != 2
                    or not all(isinstance(p, str) and p for p in images)):
                raise ValueError("`images` must be a list of two image paths")
            if not isinstance(sentence, str) or not sentence.strip():
                raise ValueError("`sentence` must be a non-empty string")
            label = _nlvr2_label(record["label"])
            identifier = record.get("identifier")
            identifier = str(identifier) if identifier not in (None, "") else f"{stem}-{i}"
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            summary.skip("nlvr2", split, "invalid_record", f"{where}: {error}")
            continue
        pair = []
        for rel in images:
            image = reader.read_path(root, rel)
            if isinstance(image, str):
                summary.skip("nlvr2", split, image, f"{where}: {rel}")
                break
            pair.append(image[0])
        if len(pair) != 2:
            continue
        yield {"identifier": identifier, "left_image": pair[0], "right_image": pair[1], "sentence": sentence,
               "label": label}


#: The official ``dataset`` field of a VQA record -> the image root it is resolved against (official
#: ``dataset/vqa_dataset.py``: ``vqa`` -> ``vqa_root``, ``vg`` -> ``vg_root``, ``gqa`` -> the path as given; a record
#: without the field uses ``vqa_root``).
_VQA_SOURCES = ("vqa", "vg", "gqa")


def _vqa_question_id(record: Mapping[str, Any], position: int) -> int:
    """The record's ``question_id`` (an int or a string of digits), else ``-(position + 1)`` (never an official id)."""
    value = record.get("question_id")
    if value is None:
        return -(position + 1)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"`question_id` must be an integer, got {value!r}")
    return int(value)  # a non-numeric string raises ValueError


def _vqa_fields(record: Any, split: str, position: int) -> tuple[str, str, str, list[str], int]:
    """``(image path, question, source, answers, question_id)`` of one official VQA record; ValueError if malformed."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    rel, question = record.get("image"), record.get("question")
    if not isinstance(rel, str) or not rel or not isinstance(question, str) or not question.strip():
        raise ValueError("needs `image` (str) and `question` (non-empty str)")
    source = record.get("dataset", "")
    if source not in ("", *_VQA_SOURCES):
        raise ValueError(f"unknown `dataset` {source!r} (expected one of {list(_VQA_SOURCES)})")
    answers = as_text_list(record.get("answer"))  # TypeError for non-string answers
    if split == "train" and not answers:
        raise LookupError("a training question without `answer`")
    return rel, question, source, answers, _vqa_question_id(record, position)


def _vqa_rows(
    paths: Sequence[str | os.PathLike], split: str, roots: Mapping[str, Path], reader: _ImageReader,
    summary: ConversionSummary, max_records: int | None,
) -> Iterator[dict[str, Any]]:
    position = 0
    for path in paths:
        for i, record in enumerate(_load_json_list(path)[: max_records]):
            where = f"{Path(path).name}[{i}]"
            position += 1
            try:
                rel, question, source, answers, question_id = _vqa_fields(record, split, position - 1)
            except LookupError as error:
                summary.skip("vqa", split, "no_answer", f"{where}: {error}")
                continue
            except (TypeError, ValueError) as error:
                summary.skip("vqa", split, "invalid_record", f"{where}: {error}")
                continue
            root = Path() if source == "gqa" else roots["vg" if source == "vg" else "vqa"]  # gqa: path as given
            image = reader.read_path(root, rel)
            if isinstance(image, str):
                summary.skip("vqa", split, image, f"{where}: {rel}")
                continue
            yield {"question_id": question_id, "image": image[0],
                   "image_id": str(record.get("image_id", image[0]["path"])),
                   "question": question, "answers": answers, "source": source, "group": ""}


def _vqa_answer_rows(path: str | os.PathLike, summary: ConversionSummary) -> Iterator[dict[str, Any]]:
    """The ``vqa_answers`` rows of ``answer_list.json``, in file order; entries that are not non-empty strings are
    skipped and counted."""
    with open(path, encoding="utf-8") as f:
        answers = json.load(f)
    if not isinstance(answers, list):
        raise ValueError(f"{path}: expected a JSON list of answer strings, got {type(answers).__name__}")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            summary.skip("vqa_answers", "test", "invalid_record", f"{Path(path).name}[{i}]: {answer!r}")
            continue
        yield {"answer": answer}


def _as_paths(value: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str | os.PathLike]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return [v for v in value if v]


def _split_name(name: str) -> str:
    if name not in SPLIT_ALIASES:
        raise ValueError(f"unknown split {name!r}; expected one of {sorted(SPLIT_ALIASES)}")
    return SPLIT_ALIASES[name]


def _check_captioning_splits(
    retrieval: Mapping[str, Any], captioning: Mapping[str, Any], captioning_gt: Mapping[str, Any]
) -> None:
    both = sorted(set(retrieval) & set(captioning))
    if both:
        raise ValueError(f"retrieval and captioning files both given for split(s) {both}: both become rows of "
                         "retrieval/<split>; convert them into separate folders")
    if "train" in captioning_gt:
        raise ValueError("captioning ground truth is for the validation and test splits only")
    orphans = sorted(set(captioning_gt) - set(captioning))
    if orphans:
        raise ValueError(f"captioning ground truth given for split(s) {orphans} without their captioning file")


def convert_official(
    out_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    pretrain_text: Iterable[str | os.PathLike] = (),
    pretrain_regions: Iterable[str | os.PathLike] = (),
    retrieval: Mapping[str, str | os.PathLike] | None = None,
    grounding: Mapping[str, str | os.PathLike] | None = None,
    nlvr2: Mapping[str, str | os.PathLike] | None = None,
    vqa: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]] | None = None,
    vqa_answer_list: str | os.PathLike | None = None,
    captioning: Mapping[str, str | os.PathLike] | None = None,
    captioning_gt: Mapping[str, str | os.PathLike] | None = None,
    vg_image_root: str | os.PathLike | None = None,
    refcoco_refs: str | os.PathLike | None = None,
    refcoco_instances: str | os.PathLike | None = None,
    refcoco_dets: str | os.PathLike | None = None,
    image_roots: Mapping[str, str | os.PathLike] | None = None,
    image_key: str | None = None,
    caption_key: str = "caption",
    verify_images: bool = True,
    max_records: int | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 500 * 1024 * 1024,
    pretty_name: str = "X-VLM dataset (converted from the official JSON files)",
    allow_outside_root: bool = False,
    progress: bool = False,
) -> ConversionSummary:
    """Convert official X-VLM JSON files into an X-VLM dataset folder at ``out_dir``.

    Args:
        out_dir: the output folder (must be empty unless ``overwrite``).
        image_root: the folder that relative image paths are resolved against.
        pretrain_text: image-text JSON-lines files or folders of them (``pretrain`` config, ``group="image_text"``).
        pretrain_regions: region/object JSON-lines files or folders (``pretrain`` config, ``group="regions"``).
        retrieval: ``{"train": coco_train.json, "val": coco_val.json, "test": coco_test.json}`` (any subset).
        grounding: ``{"train": refcoco+_train.json, "val": ..., "test": ...}`` (any subset).
        nlvr2: ``{"train": nlvr_train.json, "validation": nlvr_dev.json, "test": nlvr_test.json}`` (any subset;
            ``dev``/``val`` are accepted for ``validation``). ``identifier`` is the record's, else
            ``<file stem>-<index>``. Sentences are stored as given (``pre_caption`` is applied when collating).
        vqa: ``{"train": [vqa_train.json, vqa_val.json, vg_qa.json], "test": vqa_test.json}`` (any subset; a split
            takes one file or a list, concatenated in order as the official ``vqa_dataset`` does). One row per
            question; questions and answers stored as given; a ``train`` record without answers is skipped
            (``no_answer``). ``question_id`` is the record's, else ``-(1 + position in the split)``.
        vqa_answer_list: ``answer_list.json`` (``vqa_answers`` config, split ``test``, order kept).
        captioning: ``{"train": coco_karpathy_train.json, "val": coco_karpathy_val.json, "test":
            coco_karpathy_test.json}`` (any subset): ``retrieval`` rows (one per image, every caption; a split given
            here may not also be given in ``retrieval``). Validation/test images need a COCO id in the file name
            (official ``coco_karpathy_caption_eval``; :func:`coco_image_id`).
        captioning_gt: ``{"val": coco_karpathy_val_gt.json, "test": coco_karpathy_test_gt.json}``: the official
            references (COCO caption format); the rows of that split take their captions from it, an image
            without ground truth is skipped (``not_in_gt``).
        vg_image_root: the root of ``"dataset": "vg"`` images (official ``vg_root``; default: the ``vqa`` root).
            ``"vqa"`` records and those without ``dataset`` use the ``vqa`` root; ``"gqa"`` paths are used as given.
        refcoco_refs, refcoco_instances: ``refs(unc).p`` and ``instances.json`` giving the boxes (and the
            ``val``/``testA``/``testB`` group) of grounding records that carry no ``bbox``.
        refcoco_dets: the official ``refcoco+/dets.json``: every grounding row gets the detections of its image
            (keyed by the ref's COCO image id) as ``candidate_boxes`` for Grad-CAM grounding (``[]`` when the image
            has none, counted as ``images_without_dets``). Records with their own ``dets`` (VLUE) keep those.
        image_roots: per-config roots (``{"pretrain": ..., "retrieval": ..., "grounding": ..., "nlvr2": ...,
            "vqa": ...}``)
            overriding ``image_root``.
        image_key: the image field of pre-training lines (default: ``binary`` if present, else ``image_rpath`` or
            ``image``); caption_key: their caption field (``caption``; ``desc`` for captioning data).
        verify_images: fully decode every image (catches truncated files; slower).
        max_records: read at most this many records of each input (for smoke tests).
        allow_outside_root: read image paths that leave their image root (absolute, ``..``); stored by file name.
            Without it such records are skipped (``outside_image_root``).
        progress: a progress bar (rows written) per configuration and split.

    Returns:
        The :class:`ConversionSummary`, also written to ``out_dir/conversion_summary.json``.
    """
    retrieval = {_split_name(k): v for k, v in (retrieval or {}).items() if v}
    grounding = {_split_name(k): v for k, v in (grounding or {}).items() if v}
    nlvr2 = {_split_name(k): v for k, v in (nlvr2 or {}).items() if v}
    vqa = {_split_name(k): _as_paths(v) for k, v in (vqa or {}).items() if _as_paths(v)}
    captioning = {_split_name(k): v for k, v in (captioning or {}).items() if v}
    captioning_gt = {_split_name(k): v for k, v in (captioning_gt or {}).items() if v}
    _check_captioning_splits(retrieval, captioning, captioning_gt)
    pretrain_text, pretrain_regions = list(pretrain_text), list(pretrain_regions)
    answer_files = [vqa_answer_list] if vqa_answer_list else []
    inputs = [*pretrain_text, *pretrain_regions, *retrieval.values(), *grounding.values(), *nlvr2.values(),
              *(p for paths in vqa.values() for p in paths), *answer_files, *captioning.values(),
              *captioning_gt.values()]
    if not inputs:
        raise ValueError("nothing to convert: give pre-training, retrieval, grounding, NLVR2, VQA or captioning files")
    for path in inputs:
        if not Path(path).exists():
            raise FileNotFoundError(f"input file not found: {path}")
    roots = {name: Path((image_roots or {}).get(name) or image_root)
             for name in ("pretrain", "retrieval", "grounding", "nlvr2", "vqa")}
    roots["vg"] = Path(vg_image_root) if vg_image_root else roots["vqa"]
    boxes = None
    if refcoco_refs or refcoco_instances:
        if not (refcoco_refs and refcoco_instances):
            raise ValueError("give both refcoco_refs (refs(unc).p) and refcoco_instances (instances.json)")
        boxes = load_refcoco_boxes(refcoco_refs, refcoco_instances)
    gt_references = {split: load_coco_caption_references(path) for split, path in captioning_gt.items()}
    if refcoco_dets is not None and not Path(refcoco_dets).exists():
        raise FileNotFoundError(f"input file not found: {refcoco_dets}")
    dets = load_refcoco_dets(refcoco_dets) if refcoco_dets is not None else None

    summary = ConversionSummary()
    reader = _ImageReader(summary, verify=verify_images, allow_outside_root=allow_outside_root)
    sources = ", ".join(Path(p).name for p in inputs)
    writer = DatasetFolderWriter(
        out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes, pretty_name=pretty_name,
        card_body=f"Converted with `xvlm-data convert-official` from the official X-VLM files: {sources}.",
    )
    jobs: list[tuple[str, str, Iterator[dict[str, Any]]]] = [
        ("pretrain", "train", _pretrain_rows(paths, kind, roots["pretrain"], reader, summary, image_key, caption_key,
                                             max_records))
        for kind, paths in (("image_text", pretrain_text), ("regions", pretrain_regions)) if paths
    ]
    jobs += [("retrieval", split, _retrieval_rows(path, split, roots["retrieval"], reader, summary, max_records))
             for split, path in retrieval.items()]
    jobs += [("retrieval", split, _captioning_rows(path, split, roots["retrieval"], reader, summary, max_records,
                                                   gt_references.get(split))) for split, path in captioning.items()]
    # Candidate boxes for every grounding split when dets.json is given or a (VLUE) file carries its own `dets`.
    with_candidates = dets is not None or any(_has_dets(path) for path in grounding.values())
    jobs += [("grounding", split, _grounding_rows(path, split, roots["grounding"], reader, summary, boxes,
                                                  max_records, dets, with_candidates))
             for split, path in grounding.items()]
    jobs += [("nlvr2", split, _nlvr2_rows(path, split, roots["nlvr2"], reader, summary, max_records))
             for split, path in nlvr2.items()]
    jobs += [("vqa", split, _vqa_rows(paths, split, roots, reader, summary, max_records))
             for split, paths in vqa.items()]
    if vqa_answer_list:
        jobs.append(("vqa_answers", "test", _vqa_answer_rows(vqa_answer_list, summary)))
    with writer:
        for config, split, rows in jobs:  # the generators read their inputs lazily, one job after the other
            for row in tqdm(rows, desc=f"{config}/{split}", unit=" rows", disable=not progress, mininterval=1.0,
                            dynamic_ncols=True):
                writer.add(config, split, row)
    summary.written = {c: dict(s) for c, s in writer.counts.items()}
    write_json(Path(out_dir) / _SUMMARY_FILE, summary.to_dict())
    return summary
