"""A deterministic generator of synthetic scenes that exercises every grain of X-VLM.

Each scene is a small image (96-160 px a side, some non-square) on a dark, block-noise background with 1-4 coloured
shapes (4 shapes x 6 colours x 2 sizes). For every scene the generator produces

* three whole-image captions that name every object, with spatial relations ("a small red circle to the left of a
  large blue square and a small white diamond", "from left to right a red circle a blue square and a white diamond",
  "there are three shapes a ..."),
* one object per shape with its pixel box ``[x, y, w, h]``, captions (``"red circle"``, ``"red circle on the left"``)
  and attributes (``["small"]``),
* referring expressions that single out exactly one object (``"the red circle"``, ``"the circle on the left"``,
  ``"the leftmost shape"``, ``"the square above the green triangle"``...), each checked for a unique referent.

The ``nlvr2`` configuration pairs two scenes of a split (``left_image``, ``right_image``) with a statement about
them whose truth follows from the two scenes (:func:`generate_nlvr2_pairs`): comparisons ("the left image has more
red shapes than the right image"), quantified existence ("both images contain a circle"), exact counts ("the right
image has exactly two squares") and spatial relations inside one image ("in the left image a red circle is above a
blue square"); half the statements of a split are true.

The ``vqa`` configuration asks questions about one scene whose answer follows from the scene
(:func:`generate_vqa_questions`): colour ("what color is the circle"), shape ("what shape is the red object"), count
("how many squares are there"), position ("where is the blue triangle": left / right / top / bottom of the image
centre) and existence ("is there a green diamond": yes / no, half each); ``vqa_answers`` lists every answer the
generator can produce (:func:`vqa_answer_list`).

Splits: ``train`` and ``validation`` only use the *seen* colour-shape combinations; ``test`` also holds scenes with
some *held-out* combinations (``group == "heldout"``), never seen in training. In ``validation`` and ``test`` no two
images have the same multiset of (colour, shape), so every caption identifies one image of the gallery.

Everything is a function of the seed (and the split); a split does not depend on the sizes of the other splits.
Captions and questions use only the words of :func:`synthetic_vocabulary`, lower case and without punctuation, so the
official ``pre_caption`` / ``pre_question`` cleaning leaves them unchanged, and :func:`synthetic_tokenizer` covers them with no ``[UNK]``.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .schemas import SPLITS, DatasetFolderWriter, write_json

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "DEFAULT_HELDOUT_COMBOS",
    "GENERATOR_VERSION",
    "SyntheticConfig",
    "SceneObject",
    "Scene",
    "generate_scene",
    "generate_split",
    "scene_records",
    "NLVR2Pair",
    "NLVR2_KINDS",
    "generate_nlvr2_pairs",
    "nlvr2_record",
    "VQAQuestion",
    "VQA_KINDS",
    "generate_vqa_questions",
    "vqa_record",
    "vqa_answer_list",
    "write_synthetic_dataset",
    "synthetic_vocabulary",
    "synthetic_tokenizer",
    "relation",
    "denotation",
    "referring_expressions",
    "SPECIAL_TOKENS",
]

#: Bump when the output of the generator changes (it is part of the default cache folder name).
GENERATOR_VERSION = 4

#: Colour name -> RGB (strong, well separated hues, readable on the dark background at 64 px).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 95, 240),
    "yellow": (240, 220, 35),
    "purple": (165, 60, 215),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
#: Size name -> side of the shape as a fraction of the image's shorter side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.21, 0.27), "large": (0.33, 0.40)}
#: Colour-shape combinations that appear only in the test split (one per shape, each colour at most once).
DEFAULT_HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "diamond"),
    ("yellow", "square"),
)
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_NUMBERS = ("zero", "one", "two", "three", "four")
_SPLIT_STREAM = {"train": 1, "validation": 2, "test": 3}
#: Relation name -> the words used in captions and expressions.
_RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_SIDE_WORDS = {"left": "on the left", "right": "on the right", "above": "at the top", "below": "at the bottom"}
_EXTREME_WORDS = {"left": "leftmost", "right": "rightmost", "above": "highest", "below": "lowest"}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic dataset (every field is part of the cache key of the default dataset)."""

    seed: int = 0
    num_train: int = 4000
    num_validation: int = 200
    num_test: int = 200
    min_objects: int = 1
    max_objects: int = 4
    #: Probabilities of 1..4 objects (truncated to ``min_objects..max_objects`` and renormalised).
    object_count_weights: tuple[float, ...] = (0.3, 0.35, 0.25, 0.1)
    image_sizes: tuple[int, ...] = (96, 112, 128, 144, 160)
    #: Probability that a scene is square (otherwise width and height are drawn independently).
    square_probability: float = 0.5
    heldout_combos: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT_COMBOS
    #: Fraction of test scenes that contain at least one held-out combination.
    test_heldout_fraction: float = 0.25
    #: Probability that a scene with 2+ objects repeats an object's colour and shape (exercises "on the left").
    duplicate_probability: float = 0.2
    #: Referring expressions per object in train (validation and test use one); each is a grounding row.
    expressions_per_object_train: int = 1
    #: NLVR2 image pairs (``nlvr2`` config) per split; both images of a pair are scenes of that split. ``None``:
    #: three quarters of the split's images (3000 / 150 / 150 by default, fewer for small configs).
    num_nlvr2_train: int | None = None
    num_nlvr2_validation: int | None = None
    num_nlvr2_test: int | None = None
    #: VQA questions (``vqa`` config) per split, each about one scene of that split. ``None``: three per image
    #: (12000 / 600 / 600 by default).
    num_vqa_train: int | None = None
    num_vqa_validation: int | None = None
    num_vqa_test: int | None = None
    version: int = GENERATOR_VERSION

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError("need 1 <= min_objects <= max_objects <= 4")
        for colour, shape in self.heldout_combos:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"unknown held-out combination {(colour, shape)!r}")
        if min(self.image_sizes) < 64:
            raise ValueError("image sizes below 64 px make the small shapes unreadable")
        if not 0.0 <= self.test_heldout_fraction <= 1.0:
            raise ValueError("test_heldout_fraction must be in [0, 1]")
        for split in SPLITS:
            if self.num_nlvr2_pairs(split) < 0:
                raise ValueError(f"num_nlvr2_{split} must be >= 0")
            if self.num_nlvr2_pairs(split) and self.num_images(split) < 2:
                raise ValueError(f"NLVR2 pairs of {split!r} need at least 2 images of that split (num_{split})")
            if self.num_vqa_questions(split) < 0:
                raise ValueError(f"num_vqa_{split} must be >= 0")
            if self.num_vqa_questions(split) and self.num_images(split) < 1:
                raise ValueError(f"VQA questions of {split!r} need at least 1 image of that split (num_{split})")

    def num_images(self, split: str) -> int:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[split]

    def num_nlvr2_pairs(self, split: str) -> int:
        """NLVR2 pairs of ``split``: the ``num_nlvr2_<split>`` field, or 3/4 of its images when that is ``None``."""
        n = {"train": self.num_nlvr2_train, "validation": self.num_nlvr2_validation, "test": self.num_nlvr2_test}[split]
        if n is None:
            images = self.num_images(split)
            return images * 3 // 4 if images >= 2 else 0
        return n

    def num_vqa_questions(self, split: str) -> int:
        """VQA questions of ``split``: the ``num_vqa_<split>`` field, or 3 per image of the split when ``None``."""
        n = {"train": self.num_vqa_train, "validation": self.num_vqa_validation, "test": self.num_vqa_test}[split]
        return 3 * self.num_images(split) if n is None else n

    def cache_key(self) -> str:
        """A short, stable name for this configuration (used for the default cache folder)."""
        default = SyntheticConfig()
        parts = [f"v{self.version}", f"seed{self.seed}"]
        for f in dataclasses.fields(self):
            if f.name in ("seed", "version"):
                continue
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                parts.append(f"{f.name}={value}".replace(" ", "").replace("'", ""))
        key = "-".join(parts)
        if len(key) > 80:  # keep folder names short but unique
            import hashlib

            key = f"v{self.version}-seed{self.seed}-" + hashlib.sha1(key.encode()).hexdigest()[:12]
        return key


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene; ``x, y, side`` in pixels (the shape is inscribed in the square box)."""

    shape: str
    colour: str
    size: str
    x: int
    y: int
    side: int

    @property
    def bbox(self) -> list[float]:
        """``[x, y, w, h]`` in pixels."""
        return [float(self.x), float(self.y), float(self.side), float(self.side)]

    @property
    def x1(self) -> int:
        return self.x + self.side

    @property
    def y1(self) -> int:
        return self.y + self.side

    @property
    def cx(self) -> float:
        return self.x + self.side / 2

    @property
    def cy(self) -> float:
        return self.y + self.side / 2

    def describe(self, with_size: bool = False) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """A generated scene: geometry, texts and rendering parameters."""

    image_id: str
    width: int
    height: int
    objects: list[SceneObject]
    background: tuple[int, int, int]
    noise_block: int
    noise_seed: int
    jitter: list[tuple[int, int, int]]
    captions: list[str] = field(default_factory=list)
    #: ``(text, index of the referent in objects)``.
    expressions: list[tuple[str, int]] = field(default_factory=list)
    heldout_combos: frozenset = frozenset()

    @property
    def has_heldout(self) -> bool:
        return any((o.colour, o.shape) in self.heldout_combos for o in self.objects)

    def render(self) -> Image.Image:
        """Draw the scene (deterministic)."""
        rng = np.random.default_rng(self.noise_seed)
        b = self.noise_block
        grid = rng.integers(-14, 15, size=(self.height // b + 1, self.width // b + 1), dtype=np.int16)
        noise = np.repeat(np.repeat(grid, b, axis=0), b, axis=1)[: self.height, : self.width]
        pixels = np.clip(np.asarray(self.background, dtype=np.int16)[None, None, :] + noise[..., None], 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8), mode="RGB")
        draw = ImageDraw.Draw(image)
        for obj, jitter in zip(self.objects, self.jitter):
            colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[obj.colour], jitter))
            x0, y0, x1, y1 = obj.x, obj.y, obj.x1 - 1, obj.y1 - 1
            if obj.shape == "circle":
                draw.ellipse([x0, y0, x1, y1], fill=colour)
            elif obj.shape == "square":
                draw.rectangle([x0, y0, x1, y1], fill=colour)
            elif obj.shape == "triangle":
                draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
            elif obj.shape == "diamond":
                xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
                draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=colour)
            else:  # pragma: no cover - guarded by SHAPES
                raise ValueError(obj.shape)
        return image

    def png_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.render().save(buffer, format="PNG", compress_level=6)
        return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Geometry and language
# --------------------------------------------------------------------------------------------------------------------


def relation(a: SceneObject, b: SceneObject, name: str) -> bool:
    """Whether ``a`` is entirely ``left``/``right``/``above``/``below`` ``b`` (box separation, pixel boxes)."""
    if name == "left":
        return a.x1 <= b.x
    if name == "right":
        return a.x >= b.x1
    if name == "above":
        return a.y1 <= b.y
    if name == "below":
        return a.y >= b.y1
    raise ValueError(name)


def _location_phrase(obj: SceneObject, width: int, height: int) -> str:
    col = min(int(3 * obj.cx / width), 2)
    row = min(int(3 * obj.cy / height), 2)
    return [
        ["in the top left", "at the top", "in the top right"],
        ["on the left", "in the middle", "on the right"],
        ["in the bottom left", "at the bottom", "in the bottom right"],
    ][row][col]


def _with_article(phrases: Sequence[str]) -> str:
    items = [f"a {p}" for p in phrases]
    return items[0] if len(items) == 1 else " ".join(items[:-1]) + " and " + items[-1]


def _captions(objects: Sequence[SceneObject], width: int, height: int, rng: np.random.Generator) -> list[str]:
    n = len(objects)
    if n == 1:
        o = objects[0]
        return [
            f"a {o.describe(True)} {_location_phrase(o, width, height)}",
            f"a single {o.describe()}",
            f"there is one shape a {o.describe(True)}",
        ]
    pairs = [(i, j, r) for i, j in itertools.permutations(range(n), 2) for r in _RELATION_WORDS
             if relation(objects[i], objects[j], r)]
    i, j, rel = pairs[int(rng.integers(len(pairs)))]
    rest = [k for k in range(n) if k not in (i, j)]
    relational = f"a {objects[i].describe(True)} {_RELATION_WORDS[rel]} a {objects[j].describe(True)}"
    if rest:
        relational += " and " + _with_article([objects[k].describe(True) for k in rest])
    left_to_right = sorted(range(n), key=lambda k: (objects[k].cx, objects[k].cy))
    listing = "from left to right " + _with_article([objects[k].describe() for k in left_to_right])
    order = rng.permutation(n)
    counting = f"there are {_NUMBERS[n]} shapes " + _with_article([objects[k].describe() for k in order])
    return [relational, listing, counting]


# A referring expression is a (text, predicate) pair; the predicate returns the set of object indices it denotes.
_Predicate = Callable[[Sequence[SceneObject]], set]


def _match(colour: str | None = None, shape: str | None = None, size: str | None = None) -> Callable:
    def matches(o: SceneObject) -> bool:
        return (colour is None or o.colour == colour) and (shape is None or o.shape == shape) and (
            size is None or o.size == size
        )

    return matches


def _noun(colour: str | None, shape: str | None, size: str | None = None) -> str:
    words = [w for w in (size, colour) if w] + [shape or "shape"]
    return " ".join(words)


def denotation(objects: Sequence[SceneObject], kind: str, **kw: Any) -> set[int]:
    """Indices of the objects denoted by an expression of ``kind`` (see :func:`referring_expressions`)."""
    if kind == "attribute":
        m = _match(kw.get("colour"), kw.get("shape"), kw.get("size"))
        return {i for i, o in enumerate(objects) if m(o)}
    if kind == "side":  # the <noun> on the <side>: extreme (strictly separated) member of the matching group
        m = _match(kw.get("colour"), kw.get("shape"))
        group = [i for i, o in enumerate(objects) if m(o)]
        if len(group) < 2:
            return set()
        return {i for i in group if all(relation(objects[i], objects[j], kw["side"]) for j in group if j != i)}
    if kind == "relational":  # the <noun> <rel> the <noun2>
        m, m_ref = _match(kw.get("colour"), kw.get("shape")), _match(kw.get("ref_colour"), kw.get("ref_shape"))
        refs = [j for j, o in enumerate(objects) if m_ref(o)]
        if len(refs) != 1:  # "the <noun2>" must itself be unique
            return set()
        return {i for i, o in enumerate(objects)
                if m(o) and i != refs[0] and relation(o, objects[refs[0]], kw["rel"])}
    raise ValueError(kind)


def referring_expressions(objects: Sequence[SceneObject], target: int) -> dict[str, list[str]]:
    """Every template expression that denotes exactly ``objects[target]``, grouped by kind.

    Kinds: ``attribute`` ("the small red circle", "the red shape"), ``side`` ("the red circle on the left",
    "the leftmost shape"), ``relational`` ("the circle above the blue square").
    """
    t = objects[target]
    out: dict[str, list[str]] = {"attribute": [], "side": [], "relational": []}
    attribute_options = [
        (t.colour, t.shape, None), (None, t.shape, None), (t.colour, None, None), (t.colour, t.shape, t.size),
        (None, t.shape, t.size),
    ]
    for colour, shape, size in attribute_options:
        if denotation(objects, "attribute", colour=colour, shape=shape, size=size) == {target}:
            out["attribute"].append(f"the {_noun(colour, shape, size)}")
    if len(objects) >= 2:
        for colour, shape in [(t.colour, t.shape), (None, t.shape), (t.colour, None), (None, None)]:
            for side in _SIDE_WORDS:
                if denotation(objects, "side", colour=colour, shape=shape, side=side) == {target}:
                    if colour is None and shape is None:
                        out["side"].append(f"the {_EXTREME_WORDS[side]} shape")
                    else:
                        out["side"].append(f"the {_noun(colour, shape)} {_SIDE_WORDS[side]}")
        for j, r in enumerate(objects):
            if j == target:
                continue
            for colour, shape in [(t.colour, t.shape), (None, t.shape)]:
                for rel in _RELATION_WORDS:
                    if denotation(objects, "relational", colour=colour, shape=shape, ref_colour=r.colour,
                                  ref_shape=r.shape, rel=rel) == {target}:
                        out["relational"].append(
                            f"the {_noun(colour, shape)} {_RELATION_WORDS[rel]} the {_noun(r.colour, r.shape)}"
                        )
    return out


def _choose_expressions(
    all_options: Sequence[dict[str, list[str]]], count: int, rng: np.random.Generator
) -> list[tuple[str, int]]:
    """Pick ``count`` distinct expressions per object, first a kind (weighted) and then a template of that kind."""
    chosen: list[tuple[str, int]] = []
    kind_weights = {"attribute": 0.45, "side": 0.3, "relational": 0.25}
    for target, options in enumerate(all_options):
        picked: list[str] = []
        for _ in range(count):
            kinds = [k for k in kind_weights if [e for e in options[k] if e not in picked]]
            if not kinds:
                break
            w = np.array([kind_weights[k] for k in kinds])
            kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
            candidates = [e for e in options[kind] if e not in picked]
            picked.append(candidates[int(rng.integers(len(candidates)))])
        chosen += [(text, target) for text in picked]
    return chosen


# --------------------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------------------


def _place(
    rng: np.random.Generator, width: int, height: int, sides: Sequence[int], gap: int = 3
) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of ``sides`` that keep ``gap`` pixels apart (``None`` if placement fails)."""
    placed: list[tuple[int, int, int]] = []
    for side in sides:
        for _ in range(60):
            x = int(rng.integers(1, width - side))
            y = int(rng.integers(1, height - side))
            if all(x + side + gap <= px or px + ps + gap <= x or y + side + gap <= py or py + ps + gap <= y
                   for px, py, ps in placed):
                placed.append((x, y, side))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def generate_scene(
    rng: np.random.Generator,
    config: SyntheticConfig,
    image_id: str,
    *,
    combos: Sequence[tuple[str, str]],
    forced_combo: tuple[str, str] | None = None,
    expressions_per_object: int = 1,
) -> Scene:
    """Draw one scene from ``rng``; colour-shape pairs come from ``combos`` (plus ``forced_combo`` once)."""
    counts = np.arange(1, 5)
    weights = np.array(config.object_count_weights[:4], dtype=float)
    weights[(counts < config.min_objects) | (counts > config.max_objects)] = 0
    while True:
        if rng.random() < config.square_probability:
            width = height = int(rng.choice(config.image_sizes))
        else:
            width, height = (int(v) for v in rng.choice(config.image_sizes, size=2))
        n = int(rng.choice(counts, p=weights / weights.sum()))
        pairs = [tuple(combos[int(k)]) for k in rng.integers(len(combos), size=n)]
        if forced_combo is not None:
            pairs[int(rng.integers(n))] = tuple(forced_combo)
        if n >= 2 and rng.random() < config.duplicate_probability:
            pairs[1] = pairs[0]
        sizes = [("small", "large")[int(k)] for k in rng.integers(2, size=n)]
        short = min(width, height)
        sides = [int(round(rng.uniform(*SIZES[s]) * short)) for s in sizes]
        # Place large shapes first: it fails less often.
        order = sorted(range(n), key=lambda k: -sides[k])
        positions = _place(rng, width, height, [sides[k] for k in order])
        if positions is None:
            continue
        objects: list[SceneObject] = [None] * n  # type: ignore[list-item]
        for k, (x, y) in zip(order, positions):
            colour, shape = pairs[k]
            objects[k] = SceneObject(shape=shape, colour=colour, size=sizes[k], x=x, y=y, side=sides[k])
        # Objects are kept in left-to-right order (the order of the ``objects`` column).
        objects.sort(key=lambda o: (o.x, o.y))
        options = [referring_expressions(objects, t) for t in range(n)]
        if all(any(kinds.values()) for kinds in options):  # every object can be singled out
            break
    scene = Scene(
        image_id=image_id,
        width=width,
        height=height,
        objects=objects,
        background=tuple(int(v) for v in rng.integers(18, 75, size=3)),
        noise_block=int(rng.choice([6, 8])),
        noise_seed=int(rng.integers(2**31)),
        jitter=[tuple(int(v) for v in rng.integers(-12, 13, size=3)) for _ in objects],
        heldout_combos=frozenset(tuple(c) for c in config.heldout_combos),
    )
    scene.captions = _captions(objects, width, height, rng)
    scene.expressions = _choose_expressions(options, expressions_per_object, rng)
    return scene


def generate_split(config: SyntheticConfig, split: str) -> Iterator[Scene]:
    """Yield the scenes of ``split`` (deterministic in ``config.seed`` and ``split`` only)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; expected one of {list(_SPLIT_STREAM)}")
    rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split]])
    heldout = [tuple(c) for c in config.heldout_combos]
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in set(heldout)]
    unique = split != "train"
    used: set[tuple] = set()
    per_object = config.expressions_per_object_train if split == "train" else 1
    for index in range(config.num_images(split)):
        image_id = f"{split}-{index:06d}"
        forced = None
        if split == "test" and heldout and rng.random() < config.test_heldout_fraction:
            forced = heldout[int(rng.integers(len(heldout)))]
        for _attempt in range(10_000):
            scene = generate_scene(
                rng, config, image_id, combos=seen, forced_combo=forced, expressions_per_object=per_object
            )
            key = tuple(sorted((o.colour, o.shape) for o in scene.objects))
            if not unique or key not in used:
                used.add(key)
                break
        else:  # pragma: no cover - only with absurd split sizes
            raise RuntimeError(f"could not draw {config.num_images(split)} distinct scenes for {split!r}")
        yield scene


def scene_records(scene: Scene) -> dict[str, Any]:
    """The rows of one scene in the X-VLM schemas: ``{"pretrain": row, "retrieval": row, "grounding": [rows]}``."""
    image = {"bytes": scene.png_bytes(), "path": None}
    common = {"image": image, "image_id": scene.image_id, "width": scene.width, "height": scene.height}
    group = "heldout" if scene.has_heldout else "seen"
    objects = [
        {
            "bbox": o.bbox,
            "captions": [o.describe(), f"{o.describe()} {_location_phrase(o, scene.width, scene.height)}"],
            "attributes": [o.size],
        }
        for o in scene.objects
    ]
    grounding = []
    for k, (text, target) in enumerate(scene.expressions):
        o = scene.objects[target]
        grounding.append(
            {
                **common,
                "text": text,
                "bbox": o.bbox,
                "ref_id": int(scene.image_id.rsplit("-", 1)[1]) * 100 + k,
                "group": "heldout" if (o.colour, o.shape) in scene.heldout_combos else "seen",
            }
        )
    return {
        "pretrain": {**common, "captions": list(scene.captions), "objects": objects, "group": group},
        "retrieval": {**common, "captions": list(scene.captions), "group": group},
        "grounding": grounding,
    }


# --------------------------------------------------------------------------------------------------------------------
# NLVR2 pairs
# --------------------------------------------------------------------------------------------------------------------

#: Statement kinds of the synthetic NLVR2 pairs and the probability of trying each.
NLVR2_KINDS: dict[str, float] = {"compare": 0.3, "exists": 0.3, "count": 0.25, "spatial": 0.15}
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
_NLVR2_STREAM = 7
_SIDES = ("left", "right")


@dataclass(frozen=True)
class NLVR2Pair:
    """One synthetic NLVR2 example: two scenes of a split and a statement; ``label`` 1 iff it is true of them."""

    identifier: str
    left: Scene
    right: Scene
    sentence: str
    label: int
    kind: str


def _plural(colour: str | None, shape: str | None) -> str:
    return " ".join([w for w in (colour,) if w] + [_PLURALS[shape] if shape else "shapes"])


def _count(objects: Sequence[SceneObject], colour: str | None, shape: str | None) -> int:
    return sum(1 for o in objects if (colour is None or o.colour == colour) and (shape is None or o.shape == shape))


def _pick_noun(rng: np.random.Generator, objects: Sequence[SceneObject], allow_all: bool) -> tuple:
    """``(colour | None, shape | None)``, mostly taken from an object of the pair (so both truths are likely)."""
    grains = ["colour_shape", "shape", "colour"] + (["all"] if allow_all else [])
    grain = grains[int(rng.integers(len(grains)))]
    if grain == "all":
        return None, None
    if rng.random() < 0.75:
        o = objects[int(rng.integers(len(objects)))]
        colour, shape = o.colour, o.shape
    else:
        colour, shape = list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]
    return (colour if grain != "shape" else None), (shape if grain != "colour" else None)


def _statement(kind: str, rng: np.random.Generator, left: Scene, right: Scene) -> tuple[str, bool]:
    """Draw one statement of ``kind`` about the pair and return it with its truth value."""
    scenes = {"left": left.objects, "right": right.objects}
    union = list(left.objects) + list(right.objects)
    if kind == "compare":
        colour, shape = _pick_noun(rng, union, allow_all=True)
        side = _SIDES[int(rng.integers(2))]
        other = "right" if side == "left" else "left"
        a, b = _count(scenes[side], colour, shape), _count(scenes[other], colour, shape)
        how = ("more", "fewer", "same")[int(rng.integers(3))]
        if how == "same":
            return f"both images have the same number of {_plural(colour, shape)}", a == b
        text = f"the {side} image has {how} {_plural(colour, shape)} than the {other} image"
        return text, (a > b) if how == "more" else (a < b)
    if kind == "exists":
        colour, shape = _pick_noun(rng, union, allow_all=False)
        present = [_count(scenes[s], colour, shape) > 0 for s in _SIDES]
        noun = _noun(colour, shape)
        quantifier = int(rng.integers(3))
        if quantifier == 0:
            return f"both images contain a {noun}", all(present)
        if quantifier == 1:
            return f"exactly one image contains a {noun}", sum(present) == 1
        return f"neither image contains a {noun}", not any(present)
    if kind == "count":
        colour, shape = _pick_noun(rng, union, allow_all=True)
        scope = ("left", "right", "total")[int(rng.integers(3))]
        actual = (_count(union, colour, shape) if scope == "total" else _count(scenes[scope], colour, shape))
        n = actual + int(rng.integers(-1, 2)) if rng.random() < 0.6 else int(rng.integers(1, 5))
        n = min(max(n, 1), 4)
        noun = _noun(colour, shape) if n == 1 else _plural(colour, shape)
        if scope == "total":
            return f"there are exactly {_NUMBERS[n]} {noun} in total", actual == n
        return f"the {scope} image has exactly {_NUMBERS[n]} {noun}", actual == n
    if kind == "spatial":
        side = _SIDES[int(rng.integers(2))]
        objects = scenes[side]
        if len(objects) >= 2 and rng.random() < 0.8:  # two objects of that image: either truth is likely
            first, second = (objects[int(k)] for k in rng.choice(len(objects), size=2, replace=False))
        else:
            first, second = (union[int(k)] for k in rng.integers(len(union), size=2))
        rel = list(_RELATION_WORDS)[int(rng.integers(len(_RELATION_WORDS)))]
        truth = any(
            i != j and (a.colour, a.shape) == (first.colour, first.shape)
            and (b.colour, b.shape) == (second.colour, second.shape) and relation(a, b, rel)
            for i, a in enumerate(objects) for j, b in enumerate(objects)
        )
        return f"in the {side} image a {first.describe()} is {_RELATION_WORDS[rel]} a {second.describe()}", truth
    raise ValueError(kind)


def generate_nlvr2_pairs(
    config: SyntheticConfig, split: str, scenes: Sequence[Scene] | None = None
) -> list[NLVR2Pair]:
    """The ``config.num_nlvr2_<split>`` NLVR2 pairs of ``split`` (deterministic in the seed and the split).

    Each pair takes two different scenes of the split (``scenes``, default :func:`generate_split`) as the left and
    right image; the labels come in shuffled blocks of one true and one false, so a split is balanced to within one
    pair. A statement of a randomly chosen kind (:data:`NLVR2_KINDS`) is drawn until its truth value is the label.
    """
    n_pairs = config.num_nlvr2_pairs(split)
    if n_pairs == 0:
        return []
    scenes = list(scenes) if scenes is not None else list(generate_split(config, split))
    if len(scenes) < 2:
        raise ValueError(f"NLVR2 pairs of {split!r} need at least 2 scenes, got {len(scenes)}")
    rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], _NLVR2_STREAM])
    kinds = list(NLVR2_KINDS)
    weights = np.array([NLVR2_KINDS[k] for k in kinds])
    weights = weights / weights.sum()
    pairs: list[NLVR2Pair] = []
    labels: list[int] = []
    for index in range(n_pairs):
        if not labels:
            labels = [int(v) for v in rng.permutation(2)]
        label = labels.pop()
        i, j = (int(v) for v in rng.choice(len(scenes), size=2, replace=False))
        for _attempt in range(1000):
            kind = kinds[int(rng.choice(len(kinds), p=weights))]
            sentence, truth = _statement(kind, rng, scenes[i], scenes[j])
            if truth == bool(label):
                break
        else:  # pragma: no cover - every pair has true and false comparisons
            raise RuntimeError(f"no statement with label {label} for pair {index} of {split!r}")
        pairs.append(NLVR2Pair(f"{split}-{index:06d}", scenes[i], scenes[j], sentence, label, kind))
    return pairs


def nlvr2_record(pair: NLVR2Pair, images: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``nlvr2`` row of ``pair``; ``images`` maps ``image_id`` -> ``{"bytes", "path"}`` (rendered if absent)."""
    images = images or {}

    def image(scene: Scene) -> dict[str, Any]:
        return images.get(scene.image_id) or {"bytes": scene.png_bytes(), "path": None}

    return {"identifier": pair.identifier, "left_image": image(pair.left), "right_image": image(pair.right),
            "sentence": pair.sentence, "label": pair.label}


# --------------------------------------------------------------------------------------------------------------------
# VQA questions
# --------------------------------------------------------------------------------------------------------------------

#: Question kinds of the synthetic VQA rows (their ``group``) and the probability of trying each.
VQA_KINDS: dict[str, float] = {"exists": 0.3, "count": 0.2, "colour": 0.2, "shape": 0.15, "position": 0.15}
_VQA_STREAM = 11
#: Position answers: where the object is relative to the image centre.
_POSITIONS = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class VQAQuestion:
    """One synthetic VQA example: a question about ``scene`` and its single correct ``answer``."""

    question_id: int
    scene: Scene
    question: str
    answer: str
    kind: str


def vqa_answer_list() -> list[str]:
    """Every answer :func:`generate_vqa_questions` can produce, sorted (the ``vqa_answers`` config)."""
    return sorted({*COLOURS, *SHAPES, *_NUMBERS[1:], *_POSITIONS, "yes", "no"})


def _position(obj: SceneObject, width: int, height: int) -> str | None:
    """``left``/``right`` when the box is in one half and crosses the horizontal centre line, ``top``/``bottom``
    likewise for the vertical line; ``None`` when neither holds (a corner or the centre: ambiguous)."""
    crosses_row, crosses_column = obj.y < height / 2 < obj.y1, obj.x < width / 2 < obj.x1
    if crosses_row and obj.x1 <= width / 2:
        return "left"
    if crosses_row and obj.x >= width / 2:
        return "right"
    if crosses_column and obj.y1 <= height / 2:
        return "top"
    if crosses_column and obj.y >= height / 2:
        return "bottom"
    return None


def _the(colour: str | None, shape: str | None, size: str | None = None) -> str:
    """``the small red circle`` / ``the circle`` / ``the red object`` (``object`` when no shape is named)."""
    return "the " + " ".join([w for w in (size, colour) if w] + [shape or "object"])


def _unique_nouns(objects: Sequence[SceneObject], options: Sequence[tuple]) -> list[tuple[tuple, int]]:
    """The ``(colour, shape, size)`` nouns of ``options`` that denote exactly one object, with that object."""
    out = []
    for colour, shape, size in options:
        referents = denotation(objects, "attribute", colour=colour, shape=shape, size=size)
        if len(referents) == 1:
            out.append(((colour, shape, size), next(iter(referents))))
    return out


def _vqa_question(kind: str, rng: np.random.Generator, scene: Scene, label: str) -> tuple[str, str] | None:
    """Draw one ``(question, answer)`` of ``kind`` about ``scene`` (``None`` if the scene has none of that kind).

    ``label`` (``"yes"``/``"no"``) is the wanted answer of an ``exists`` question.
    """
    objects = scene.objects
    o = objects[int(rng.integers(len(objects)))]
    if kind == "exists":
        grain = int(rng.integers(3))  # 0: colour and shape, 1: shape, 2: colour
        if label == "yes":
            colour, shape = o.colour, o.shape
        else:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour, shape = (None if grain == 1 else colour), (None if grain == 2 else shape)
        present = _count(objects, colour, shape) > 0
        if present != (label == "yes"):
            return None
        return f"is there a {_noun(colour, shape)}", label
    if kind == "count":
        grain = int(rng.integers(4))  # 0: colour and shape, 1: shape, 2: colour, 3: every shape
        colour = o.colour if grain in (0, 2) else None
        shape = o.shape if grain in (0, 1) else None
        return f"how many {_plural(colour, shape)} are there", _NUMBERS[_count(objects, colour, shape)]
    if kind == "colour":
        nouns = _unique_nouns(objects, [(None, o.shape, None), (None, o.shape, o.size)])
        if not nouns:
            return None
        (_, shape, size), target = nouns[int(rng.integers(len(nouns)))]
        return f"what color is {_the(None, shape, size)}", objects[target].colour
    if kind == "shape":
        nouns = _unique_nouns(objects, [(o.colour, None, None), (o.colour, None, o.size)])
        if not nouns:
            return None
        (colour, _, size), target = nouns[int(rng.integers(len(nouns)))]
        return f"what shape is {_the(colour, None, size)}", objects[target].shape
    if kind == "position":
        where = _position(o, scene.width, scene.height)
        nouns = _unique_nouns(objects, [(o.colour, o.shape, None), (None, o.shape, None), (o.colour, None, None)])
        if where is None or not nouns:
            return None
        (colour, shape, _), _target = nouns[int(rng.integers(len(nouns)))]
        return f"where is {_the(colour, shape)}", where
    raise ValueError(kind)


def generate_vqa_questions(
    config: SyntheticConfig, split: str, scenes: Sequence[Scene] | None = None
) -> list[VQAQuestion]:
    """The ``config.num_vqa_<split>`` VQA questions of ``split`` (deterministic in the seed and the split).

    Question ``q`` is about scene ``q % len(scenes)`` (``scenes``, default :func:`generate_split`), so the default
    three per image cover every scene three times; a scene never gets the same question twice. A kind is drawn
    (:data:`VQA_KINDS`) until the scene has a question of it; colour, shape and position questions name a unique
    object, position questions are only asked when the object is clearly on one side of the centre. The ``exists``
    answers come in blocks of one ``yes`` and one ``no`` (shuffled; a scene that has no new question with the next
    label takes the other one of the block), so they are balanced to within one question.
    """
    n_questions = config.num_vqa_questions(split)
    if n_questions == 0:
        return []
    scenes = list(scenes) if scenes is not None else list(generate_split(config, split))
    if not scenes:
        raise ValueError(f"VQA questions of {split!r} need at least 1 scene")
    rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], _VQA_STREAM])
    kinds = list(VQA_KINDS)
    weights = np.array([VQA_KINDS[k] for k in kinds])
    weights = weights / weights.sum()
    asked: dict[str, set[str]] = {}
    labels: list[str] = []
    questions: list[VQAQuestion] = []
    for index in range(n_questions):
        scene = scenes[index % len(scenes)]
        seen = asked.setdefault(scene.image_id, set())
        if not labels:
            labels = [("no", "yes")[int(v)] for v in rng.permutation(2)]
        for attempt in range(1000):
            kind = kinds[int(rng.choice(len(kinds), p=weights))]
            # alternate between the labels left in the block: a scene may only have new questions of one of them
            drawn = _vqa_question(kind, rng, scene, labels[attempt % len(labels)])
            if drawn is not None and drawn[0] not in seen:
                break
        else:
            raise RuntimeError(f"no new question for scene {scene.image_id!r}: num_vqa_{split} is too large")
        if kind == "exists":
            labels.remove(drawn[1])
        seen.add(drawn[0])
        questions.append(VQAQuestion(index, scene, drawn[0], drawn[1], kind))
    return questions


#: Annotators per synthetic question, as in VQA v2 (all agree: the answer is determined by the scene), so the soft
#: VQA accuracy (min(#annotators / 3, 1)) of a correct answer is 1.
SYNTHETIC_ANNOTATORS = 10


def vqa_record(question: VQAQuestion, images: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``vqa`` row of ``question`` (``SYNTHETIC_ANNOTATORS`` copies of its answer, ``source == ""``,
    ``group`` = the kind); ``images`` as for :func:`nlvr2_record`."""
    scene = question.scene
    image = (images or {}).get(scene.image_id) or {"bytes": scene.png_bytes(), "path": None}
    return {"question_id": question.question_id, "image": image, "image_id": scene.image_id,
            "question": question.question, "answers": [question.answer] * SYNTHETIC_ANNOTATORS, "source": "",
            "group": question.kind}


_CARD = """\
Synthetic scenes for X-VLM (generated by `xvlm-data synthetic`, `modeling_xvlm.data.synthetic`, generator version
{version}). Images of 1-4 coloured shapes (circle, square, triangle, diamond; red, green, blue, yellow, purple,
white; small or large) on a noisy background. Whole-image captions name every object with a spatial relation; each
object has a pixel box, captions and a size attribute; referring expressions single out one object.

The `nlvr2` config pairs two scenes of a split with a statement about them ("the left image has more red shapes than
the right image", "both images contain a circle", "the right image has exactly two squares", "in the left image a
red circle is above a blue square"); `label` is 1 when it is true of the pair (half of each split).

The `vqa` config asks about one image, with the correct answer given by all ten "annotators" in `answers` (as VQA v2
has ten per question) and the question kind in `group`:
"what color is the circle", "what shape is the red object", "how many squares are there", "where is the blue
triangle" (left, right, top or bottom of the image centre), "is there a green diamond" (yes or no, half each).
`vqa_answers` (split `test`) lists every answer the questions can have, sorted.

The test split also contains the held-out colour-shape combinations {heldout} (rows with `group == "heldout"`); train
and validation never do. In validation and test no two images share the same set of coloured shapes.

Generator parameters: `{params}`.
"""


def write_synthetic_dataset(
    out_dir: str | Path,
    config: SyntheticConfig | None = None,
    *,
    overwrite: bool = False,
    splits: Sequence[str] = SPLITS,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate the synthetic dataset into ``out_dir`` (configs ``pretrain``, ``retrieval``, ``grounding``, ``nlvr2``,
    ``vqa``, ``vqa_answers``); ``progress``: a progress bar of the scenes of each split.

    Returns a summary ``{"counts": {config: {split: rows}}, "seconds": ..., "config": {...}}``, also written to
    ``out_dir/xvlm_dataset_info.json`` (the last file written: its presence marks a complete dataset).
    """
    config = config or SyntheticConfig()
    start = time.perf_counter()
    params = dataclasses.asdict(config)
    body = _CARD.format(
        version=config.version,
        heldout=", ".join(f"{c} {s}" for c, s in config.heldout_combos) or "(none)",
        params=params,
    )
    writer = DatasetFolderWriter(
        out_dir, overwrite=overwrite, pretty_name="X-VLM synthetic shapes", card_body=body,
        card_metadata={"license": "cc0-1.0", "size_categories": ["1K<n<10K"]},
    )
    with writer:
        for split in splits:
            scenes, images = [], {}
            scenes_of_split = tqdm(generate_split(config, split), total=config.num_images(split), unit=" scenes",
                                   desc=f"scenes/{split}", disable=not progress, mininterval=1.0)
            for scene in scenes_of_split:
                rows = scene_records(scene)
                writer.add("pretrain", split, rows["pretrain"])
                writer.add("retrieval", split, rows["retrieval"])
                for row in rows["grounding"]:
                    writer.add("grounding", split, row)
                scenes.append(scene)
                images[scene.image_id] = rows["retrieval"]["image"]
            for pair in generate_nlvr2_pairs(config, split, scenes):
                writer.add("nlvr2", split, nlvr2_record(pair, images))
            for question in generate_vqa_questions(config, split, scenes):
                writer.add("vqa", split, vqa_record(question, images))
        for answer in vqa_answer_list():
            writer.add("vqa_answers", "test", {"answer": answer})
    summary = {
        "kind": "xvlm-synthetic",
        "config": params,
        "cache_key": config.cache_key(),
        "counts": writer.counts,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(Path(out_dir) / "xvlm_dataset_info.json", summary)
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary and tokenizer
# --------------------------------------------------------------------------------------------------------------------

_FUNCTION_WORDS = (
    "a", "the", "and", "of", "to", "in", "on", "at", "from", "there", "is", "are", "single", "shape", "shapes",
    "left", "right", "top", "bottom", "middle", "above", "below", "leftmost", "rightmost", "highest", "lowest",
)
#: Words of the NLVR2 statements only (after the others in the vocabulary, so older token ids do not move).
_NLVR2_WORDS = (
    "image", "images", "has", "have", "more", "fewer", "than", "both", "same", "number", "contain", "contains",
    "exactly", "neither", "total", "circles", "squares", "triangles", "diamonds",
)
#: Words of the VQA questions and answers only (last, so older token ids do not move).
_VQA_WORDS = ("what", "color", "how", "many", "where", "object", "yes", "no")


def synthetic_vocabulary() -> list[str]:
    """Every token the generator can produce, after the specials ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4).

    The order is fixed, so token ids are stable across versions of the generator that keep the same words.
    """
    words = list(_FUNCTION_WORDS) + list(_NUMBERS[1:]) + list(COLOURS) + list(SHAPES) + list(SIZES)
    words += list(_NLVR2_WORDS) + list(_VQA_WORDS)
    seen: set[str] = set()
    vocab = list(SPECIAL_TOKENS)
    for word in words:
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    return vocab


def synthetic_tokenizer(model_max_length: int = 40):
    """A ``transformers.BertTokenizer`` (WordPiece, lower case) over :func:`synthetic_vocabulary`.

    ``[PAD]`` = 0, ``[UNK]`` = 1, ``[CLS]`` = 2, ``[SEP]`` = 3, ``[MASK]`` = 4. Built from a ``vocab=`` dict: in
    transformers 5.x ``BertTokenizer(vocab_file=...)`` ignores the file.
    """
    from transformers import BertTokenizer

    vocab = {token: i for i, token in enumerate(synthetic_vocabulary())}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)
