"""Official X-VLM training augmentations (official `dataset/__init__.py`, `dataset/randaugment.py`), driven by an explicit ``random.Random``.

Every function takes the RNG it draws from, so a batch is a pure function of its seed (this is what makes
``--resume`` exact, see :mod:`modeling_xvlm.training.data`).

* :func:`random_resized_crop` - torchvision's ``RandomResizedCrop`` sampling (scale, log-uniform ratio, 10 tries,
  centre-crop fallback) with PIL bicubic resizing.
* :class:`RandomAugment` - the official ``RandomAugment(N=2, M=7)``: two operations drawn with replacement, each
  applied with probability 0.5 at magnitude 7/10. ``box_safe=True`` keeps the photometric operations only
  (Identity, AutoContrast, Equalize, Brightness, Sharpness), as the official region/grounding ``box_transform``.
  PIL reimplementation of the official cv2/numpy operations (same arguments; pixel values can differ slightly).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "random_resized_crop",
    "RandomAugment",
    "ALL_OPS",
    "BOX_SAFE_OPS",
    "hflip",
]

#: Operation list of the official ``pretrain_transform`` / ``train_transform``.
ALL_OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
#: Operations that do not move pixels (the official ``box_transform``).
BOX_SAFE_OPS: tuple[str, ...] = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness")

_FILL = (128, 128, 128)


def hflip(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def random_resized_crop(
    image: Image.Image,
    size: int,
    rng: random.Random,
    scale: Sequence[float] = (0.5, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision ``RandomResizedCrop(size, scale, ratio, BICUBIC)`` on a PIL image, sampled from ``rng``."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            break
    else:  # centre crop with the ratio clamped into range
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)


class RandomAugment:
    """Official ``RandomAugment(N, M, isPIL=True, augs=...)`` (``dataset/randaugment.py``).

    Args:
        num_ops: operations per image (official 2), drawn with replacement.
        magnitude: level out of 10 (official 7): enhance factor ``M/10 * 1.8 + 0.1``, shear ``M/10 * 0.3``,
            translate ``M/10 * translate_const`` pixels, rotate ``M/10 * 30`` degrees; geometric operations get a
            random sign.
        box_safe: only the photometric operations (:data:`BOX_SAFE_OPS`).
        translate_const: official 10 (so 7 px at magnitude 7, in pixels of the model input).
        prob: probability of applying each drawn operation (official 0.5).
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 7,
        box_safe: bool = False,
        translate_const: float = 10.0,
        prob: float = 0.5,
    ) -> None:
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.ops = BOX_SAFE_OPS if box_safe else ALL_OPS
        self.translate_const = translate_const
        self.prob = prob

    def _apply(self, name: str, image: Image.Image, rng: random.Random) -> Image.Image:
        level = self.magnitude / 10.0
        sign = -1.0 if rng.random() < 0.5 else 1.0
        if name == "Identity":
            return image
        if name == "AutoContrast":
            return ImageOps.autocontrast(image)
        if name == "Equalize":
            return ImageOps.equalize(image)
        if name == "Brightness":
            return ImageEnhance.Brightness(image).enhance(level * 1.8 + 0.1)
        if name == "Sharpness":
            return ImageEnhance.Sharpness(image).enhance(level * 1.8 + 0.1)
        if name == "ShearX":
            s = sign * level * 0.3
            return image.transform(image.size, Image.Transform.AFFINE, (1, s, 0, 0, 1, 0), fillcolor=_FILL)
        if name == "ShearY":
            s = sign * level * 0.3
            return image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, s, 1, 0), fillcolor=_FILL)
        if name == "TranslateX":
            t = sign * level * self.translate_const
            return image.transform(image.size, Image.Transform.AFFINE, (1, 0, -t, 0, 1, 0), fillcolor=_FILL)
        if name == "TranslateY":
            t = sign * level * self.translate_const
            return image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, -t), fillcolor=_FILL)
        if name == "Rotate":
            return image.rotate(sign * level * 30.0, fillcolor=_FILL)
        raise ValueError(f"unknown RandAugment operation {name!r}")

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        for _ in range(self.num_ops):
            name = self.ops[rng.randrange(len(self.ops))]
            if rng.random() < self.prob:
                image = self._apply(name, image, rng)
        return image
