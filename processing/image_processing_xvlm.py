"""X-VLM image processors (official `dataset/__init__.py`: torchvision 0.8 bicubic on PIL images).

Evaluation-time X-VLM preprocessing: squash the image to a square ``size`` (aspect ratio not kept, no crop) with
bicubic resampling, rescale by 1/255 and normalise with the CLIP mean/std (for every backbone, Swin included).

Two backends, as in transformers 5.x:

* :class:`XVLMImageProcessorPil` (``PilBackend``): resizes PIL images with PIL bicubic exactly as the official
  ``torchvision 0.8`` pipeline did, so it reproduces the official inputs. It is the default everywhere (see
  :func:`register_image_processor`).
* :class:`XVLMImageProcessor` (``TorchvisionBackend``): batched tensor resizing; uses torchvision when installed and
  falls back to ``torch.nn.functional.interpolate`` (bicubic, antialias) otherwise, so it always works. Its numbers
  differ slightly from PIL bicubic (tensor bicubic kernel), which is why PIL is the default.

Both first turn every input into an 8-bit RGB PIL image (:func:`load_image_rgb`): grayscale, RGBA/LA/P (alpha
composited onto white, the transformers convention), CMYK, 16-bit and float inputs are converted; unreadable,
zero-size or out-of-range inputs raise a ``ValueError`` naming ``images[i]``.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs
from transformers.utils import is_torchvision_available

from .boxes import (
    box_convert,
    grid_shape,
    normalize_boxes,
    region_masks_from_boxes,
    scale_boxes_to_input,
    validate_and_clip_box,
    whole_image_region_masks,
)

__all__ = [
    "XVLMImageProcessor",
    "XVLMImageProcessorPil",
    "XVLMImageProcessorKwargs",
    "load_image_rgb",
    "load_images_rgb",
]


class XVLMImageProcessorKwargs(ImagesKwargs, total=False):
    """``patch_size``: total stride of the vision encoder (32 for Swin-B), used for region masks."""

    patch_size: int


# ----------------------------------------------------------------------------------------------------------------
# Input standardisation
# ----------------------------------------------------------------------------------------------------------------


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """Map an integer/float/bool pixel array to uint8 (see module docs for the rules)."""
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite pixel values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{name} has float pixel values in [{lo}, {hi}]; expected [0, 1] or [0, 255] (already normalised "
                "inputs are not accepted)"
            )
        scaled = arr * 255.0 if hi <= 1.0 else arr
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise ValueError(f"{name} has negative integer pixel values (min {lo})")
        if arr.dtype == np.uint16 or arr.dtype.itemsize >= 2 and hi > 255:
            if hi > 65535:
                raise ValueError(f"{name} has integer pixel values above 65535 (max {hi})")
            # 16-bit: full range 0..65535 -> 0..255 (65535 / 257 = 255)
            return np.clip(np.round(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return arr.astype(np.uint8)
    raise ValueError(f"{name} has an unsupported pixel dtype {arr.dtype}")


def _channels_last(arr: np.ndarray, prefer_first: bool, input_data_format: str | None, name: str) -> np.ndarray:
    if arr.ndim == 2:
        return arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must have 2 or 3 dimensions (H, W[, C] or C, H, W), got shape {arr.shape}")
    fmt = str(getattr(input_data_format, "value", input_data_format)) if input_data_format is not None else None
    if fmt in ("channels_first", "first"):
        return np.moveaxis(arr, 0, -1)
    if fmt in ("channels_last", "last"):
        return arr
    first_ok, last_ok = arr.shape[0] in (1, 2, 3, 4), arr.shape[-1] in (1, 2, 3, 4)
    if first_ok and (not last_ok or prefer_first):
        return np.moveaxis(arr, 0, -1)
    if last_ok:
        return arr
    raise ValueError(f"{name}: cannot find a channel dimension of size 1, 2, 3 or 4 in shape {arr.shape}")


def _pil_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name} has zero size ({image.width}x{image.height})")
    try:
        image.load()
    except Exception as err:  # truncated / corrupt file
        raise ValueError(f"{name} could not be read: {err}") from err
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float single-channel images: PIL's own convert clips at 255, so scale instead
        arr = _to_uint8(np.array(image), name)
        return PIL.Image.fromarray(arr, mode="L").convert("RGB")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"{name} has PIL mode {mode!r} which cannot be converted to RGB: {err}") from err


def load_image_rgb(
    image: Any, name: str = "image", input_data_format: str | None = None
) -> PIL.Image.Image:
    """Turn one input into an 8-bit RGB PIL image.

    Accepts a PIL image (any mode), a path, a numpy array or a torch tensor (``(H, W)``, ``(H, W, C)`` or
    ``(C, H, W)`` with C in 1..4; tensors default to channels-first and arrays to channels-last when ambiguous;
    override with ``input_data_format``). Pixel types: uint8; bool; 16-bit integers (``value / 257``); floats in
    ``[0, 1]`` (× 255) or ``[0, 255]``. Alpha is composited onto white.

    Raises:
        ValueError: naming ``name`` for unreadable files, zero-size images, unsupported shapes/dtypes or values.
    """
    if isinstance(image, (str, os.PathLike)):
        try:
            with PIL.Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except Exception as err:
            raise ValueError(f"{name} ({os.fspath(image)!r}) could not be read as an image: {err}") from err
    if isinstance(image, PIL.Image.Image):
        return _pil_rgb(image, name)
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.dtype == torch.bfloat16 or arr.dtype == torch.float16:
            arr = arr.float()
        arr = arr.numpy()
        prefer_first = True
    elif isinstance(image, np.ndarray):
        arr = image
        prefer_first = False
    else:
        raise ValueError(
            f"{name} has unsupported type {type(image).__name__}; expected a PIL image, numpy array, torch tensor "
            "or path"
        )
    if arr.size == 0 or 0 in arr.shape:
        raise ValueError(f"{name} has zero size (shape {tuple(arr.shape)})")
    arr = _to_uint8(_channels_last(np.asarray(arr), prefer_first, input_data_format, name), name)
    channels = arr.shape[-1]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    pil = PIL.Image.fromarray(np.ascontiguousarray(arr if channels > 1 else arr[..., 0]), mode=mode)
    return _pil_rgb(pil, name)


def _flatten_images(images: Any) -> list[Any]:
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        out: list[Any] = []
        for item in images:
            out.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
        return out
    return [images]


def load_images_rgb(images: Any, input_data_format: str | None = None) -> list[PIL.Image.Image]:
    """Flatten ``images`` (one image, a (nested) list, or a 4-D batch) and convert each; errors name ``images[i]``."""
    flat = _flatten_images(images)
    if not flat:
        raise ValueError("images is empty")
    return [load_image_rgb(img, f"images[{i}]", input_data_format) for i, img in enumerate(flat)]


# ----------------------------------------------------------------------------------------------------------------
# Shared behaviour
# ----------------------------------------------------------------------------------------------------------------


class _XVLMImageProcessorMixin:
    """Defaults, box helpers and post-processing shared by both backends."""

    valid_kwargs = XVLMImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 384, "width": 384}
    default_to_square = True
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    patch_size = 32

    # -- images --------------------------------------------------------------------------------------------------

    def preprocess(self, images: Any, *args, **kwargs):
        """Preprocess images -> ``BatchFeature(pixel_values=(N, 3, H, W))``.

        Inputs go through :func:`load_image_rgb` first (so every mode / dtype is handled and bad inputs raise a
        ``ValueError`` naming ``images[i]``), then through the backend's resize / rescale / normalise.
        ``do_convert_rgb=False`` only accepts inputs that already have 3 channels.
        """
        input_data_format = kwargs.get("input_data_format")
        do_convert_rgb = kwargs.get("do_convert_rgb")
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        if not do_convert_rgb:
            for i, img in enumerate(_flatten_images(images)):
                channels = (
                    len(img.getbands()) if isinstance(img, PIL.Image.Image)
                    else None if isinstance(img, (str, os.PathLike)) else None
                )
                if channels is not None and channels != 3:
                    raise ValueError(f"images[{i}] has {channels} channels and do_convert_rgb=False")
        rgb = load_images_rgb(images, input_data_format=input_data_format)
        kwargs.pop("input_data_format", None)
        kwargs["do_convert_rgb"] = True
        return super().preprocess(rgb, *args, **kwargs)

    @staticmethod
    def get_image_sizes(images: Any) -> list[tuple[int, int]]:
        """``(height, width)`` of each (flattened, converted) input image."""
        return [(im.height, im.width) for im in load_images_rgb(images)]

    @property
    def input_size(self) -> tuple[int, int]:
        """``(H_in, W_in)`` of the model input."""
        size = self.size
        h = size["height"] if isinstance(size, dict) else size.height
        w = size["width"] if isinstance(size, dict) else size.width
        return int(h), int(w)

    @property
    def num_patches(self) -> int:
        """``P = (H_in / patch_size) * (W_in / patch_size)``."""
        rows, cols = grid_shape(self.input_size, self.patch_size)
        return rows * cols

    # -- boxes ---------------------------------------------------------------------------------------------------

    def prepare_boxes(
        self,
        boxes: Sequence[Any | None],
        original_sizes: Sequence[Sequence[int]],
        box_format: str = "xywh",
        names: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn pixel boxes of the original images into model targets and region masks.

        Args:
            boxes: ``N`` boxes (4 numbers in ``box_format``, pixel coordinates of the original image) or ``None``
                (whole image).
            original_sizes: ``N`` ``(height, width)`` of the image each box refers to.
            box_format: ``"xywh"`` (official / COCO), ``"xyxy"`` or ``"cxcywh"``.
            names: names for error messages (default ``boxes[i]``).

        Returns:
            ``labels`` ``(N, 4)`` float32 normalised ``(cx, cy, w, h)`` w.r.t. the model input (``[0.5, 0.5,
            1, 1]`` for ``None``), and ``region_masks`` ``(N, 1 + P)`` long (all ones for ``None``).
        """
        if len(boxes) != len(original_sizes):
            raise ValueError(f"got {len(boxes)} boxes but {len(original_sizes)} image sizes")
        input_size = self.input_size
        targets = torch.zeros(len(boxes), 4, dtype=torch.float64)
        masks = whole_image_region_masks(len(boxes), input_size, self.patch_size)
        for i, (box, hw) in enumerate(zip(boxes, original_sizes)):
            name = names[i] if names is not None else f"boxes[{i}]"
            if box is None:
                targets[i] = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
                continue
            xyxy = validate_and_clip_box(box, hw, box_format, name)[None]
            scaled = scale_boxes_to_input(xyxy, hw, input_size)
            targets[i] = normalize_boxes(scaled, input_size)[0]
            masks[i] = region_masks_from_boxes(box_convert(scaled, "xyxy", "xywh"), input_size, self.patch_size)[0]
        return targets.float(), masks

    def post_process_grounding(
        self,
        outputs: Any,
        target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        box_format: str = "xyxy",
    ) -> list[dict[str, torch.Tensor]]:
        """Predicted boxes back to pixel coordinates of the original images (official ``Grounding_bbox.py``).

        Args:
            outputs: a model output with ``pred_boxes`` ``(B, 4)`` (sigmoid ``cxcywh`` normalised to the model
                input), a dict with that key, or the tensor itself.
            target_sizes: ``(B, 2)`` ``(height, width)`` of each original image (a tensor or ``B`` pairs); ``None``
                keeps normalised coordinates.
            box_format: output format, ``"xyxy"`` (default, like ``post_process_object_detection``), ``"xywh"``
                (the official evaluation format) or ``"cxcywh"``.

        Returns:
            ``B`` dicts ``{"boxes": (1, 4) float tensor}``. No ``"scores"``: the X-VLM bbox head predicts one box
            per text without a confidence. Boxes are not clipped (the official evaluation does not clip).
            :meth:`post_process_grounded_object_detection` gives the OWL-ViT / Grounding DINO format instead.
        """
        pred = _pred_boxes(outputs)
        boxes = box_convert(pred.float(), "cxcywh", box_format)
        if target_sizes is not None:
            sizes = _target_sizes(target_sizes, pred.shape[0]).to(pred.device)
            h, w = sizes[:, 0], sizes[:, 1]
            boxes = boxes * torch.stack((w, h, w, h), dim=-1)
        return [{"boxes": b[None]} for b in boxes]

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.1,
        target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """transformers' detection format (what its ``"zero-shot-object-detection"`` pipeline reads): per row
        ``{"scores": (n,), "labels": (n,) long, "boxes": (n, 4) pixel xyxy}`` with ``n`` 1, or 0 when the score is
        not above ``threshold``. The one box of a row has score 1.0 and label 0 (its text): the X-VLM bbox head
        gives no confidence. Arguments as :meth:`post_process_grounded_object_detection`."""
        boxes = self.post_process_grounding(outputs, target_sizes=target_sizes, box_format="xyxy")
        results = []
        for row in boxes:
            scores = torch.ones(1, dtype=row["boxes"].dtype, device=row["boxes"].device)
            keep = scores > threshold
            labels = torch.zeros(1, dtype=torch.long, device=scores.device)
            results.append({"scores": scores[keep], "labels": labels[keep], "boxes": row["boxes"][keep]})
        return results

    def post_process_grounded_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.1,
        target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        text_labels: Sequence[str | Sequence[str]] | None = None,
    ) -> list[dict[str, Any]]:
        """Grounding boxes in the format of OWL-ViT's and Grounding DINO's method of the same name.

        Each row of ``outputs`` is one (image, text) pair: X-VLM predicts one box per text.

        Args:
            outputs: ``XVLMForGroundingOutput``, a dict with ``pred_boxes`` or the ``(B, 4)`` tensor.
            threshold: boxes whose score is not above it are dropped (the score is always 1.0, see below).
            target_sizes: ``(height, width)`` of each original image: a ``(B, 2)`` tensor or ``B`` pairs;
                ``None`` keeps coordinates normalised to ``[0, 1]``.
            text_labels: the text of each row (a str, or a one-element list as OWL-ViT's per-image lists).

        Returns:
            ``B`` dicts ``{"scores": (n,) float, "labels": (n,) long, "boxes": (n, 4) x0, y0, x1, y1,
            "text_labels": list of n str or None}``, ``n`` 1 (0 when dropped by ``threshold``). ``scores`` are 1.0
            and ``labels`` 0 (the row's text): the X-VLM bbox head gives no confidence.
        """
        results = self.post_process_object_detection(outputs, threshold=threshold, target_sizes=target_sizes)
        if text_labels is None:
            for result in results:
                result["text_labels"] = None
            return results
        if isinstance(text_labels, str) or not isinstance(text_labels, Sequence):
            raise ValueError("text_labels must be a list with one text per row of pred_boxes")
        if len(text_labels) != len(results):
            raise ValueError(
                f"text_labels has {len(text_labels)} entries but there are {len(results)} predicted boxes"
            )
        for i, (result, text) in enumerate(zip(results, text_labels)):
            if not isinstance(text, str):
                if isinstance(text, Sequence) and len(text) == 1 and isinstance(text[0], str):
                    text = text[0]
                else:
                    raise ValueError(
                        f"text_labels[{i}] must be one str (X-VLM predicts one box per text), got {text!r}"
                    )
            result["text_labels"] = [text] * len(result["labels"])
        return results


def _pred_boxes(outputs: Any) -> torch.Tensor:
    """``pred_boxes`` ``(B, 4)`` of a model output, a dict or the tensor itself (one box ``(4,)`` is one row)."""
    if isinstance(outputs, torch.Tensor):
        pred = outputs
    elif isinstance(outputs, dict):
        if "pred_boxes" not in outputs:
            raise ValueError(f"outputs has no 'pred_boxes' (keys: {sorted(outputs)})")
        pred = outputs["pred_boxes"]
    elif hasattr(outputs, "pred_boxes"):
        pred = outputs.pred_boxes
    else:
        raise ValueError(
            f"outputs must be a model output, a dict with 'pred_boxes' or a tensor, got {type(outputs).__name__}"
        )
    pred = torch.as_tensor(pred).detach()
    if pred.ndim == 1:
        pred = pred[None]
    if pred.ndim != 2 or pred.shape[-1] != 4:
        raise ValueError(f"pred_boxes must have shape (B, 4), got {tuple(pred.shape)}")
    return pred


def _is_size_pair(pair: Any) -> bool:
    if isinstance(pair, (torch.Tensor, np.ndarray)):
        return tuple(pair.shape) == (2,)
    if isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
        return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
    return False


def _target_sizes(target_sizes: Any, batch_size: int) -> torch.Tensor:
    """``target_sizes`` (a ``(B, 2)`` tensor / array or ``B`` ``(height, width)`` pairs) as a float ``(B, 2)``
    tensor; a ``ValueError`` names what is wrong (shape, length, non-positive or non-finite sizes)."""
    if isinstance(target_sizes, (torch.Tensor, np.ndarray)):
        sizes = torch.as_tensor(target_sizes)
        if sizes.ndim != 2 or sizes.shape[-1] != 2:
            raise ValueError(
                f"target_sizes must have shape (batch_size, 2) (height, width), got {tuple(sizes.shape)}"
            )
    elif isinstance(target_sizes, Sequence) and not isinstance(target_sizes, str):
        for i, pair in enumerate(target_sizes):
            if not _is_size_pair(pair):
                raise ValueError(f"target_sizes[{i}] must be a (height, width) pair of numbers, got {pair!r}")
        sizes = torch.tensor([[float(v) for v in pair] for pair in target_sizes]).reshape(-1, 2)
    else:
        raise ValueError(
            "target_sizes must be a (batch_size, 2) tensor or a list of (height, width) pairs, got "
            f"{type(target_sizes).__name__}"
        )
    if sizes.shape[0] != batch_size:
        raise ValueError(f"target_sizes has {sizes.shape[0]} entries but there are {batch_size} predicted boxes")
    sizes = sizes.float()
    if not torch.isfinite(sizes).all() or (sizes <= 0).any():
        raise ValueError(f"target_sizes must be positive (height, width), got {sizes.tolist()}")
    return sizes


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------


class XVLMImageProcessorPil(_XVLMImageProcessorMixin, PilBackend):
    """X-VLM image processor, PIL backend (reproduces the official preprocessing exactly).

    Defaults: ``size={"height": 384, "width": 384}`` square resize, bicubic, rescale 1/255, CLIP mean/std,
    ``do_convert_rgb=True``, ``patch_size=32`` (total stride of the vision encoder, for region masks).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)


class XVLMImageProcessor(_XVLMImageProcessorMixin, TorchvisionBackend):
    """X-VLM image processor, tensor ("torchvision") backend; works without torchvision (pure-torch fallback).

    Same defaults as :class:`XVLMImageProcessorPil`. Bicubic tensor resizing (antialiased) differs from PIL by a
    few grey levels; use the PIL processor to reproduce the official numbers.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def resize(self, image: torch.Tensor, size: SizeDict, resample: Any = None, antialias: bool = True, **kwargs):
        """Resize ``(..., C, H, W)`` to ``(size.height, size.width)``; bicubic by default."""
        if is_torchvision_available():
            return super().resize(image, size, resample=resample, antialias=antialias, **kwargs)
        if not (size.height and size.width):
            raise ValueError(f"size must have 'height' and 'width', got {size}")
        mode = "bilinear" if resample in (PILImageResampling.BILINEAR, 2) else "bicubic"
        if resample in (PILImageResampling.NEAREST, 0):
            mode = "nearest"
        orig_dtype = image.dtype
        x = image.float()
        squeeze = x.ndim == 3
        if squeeze:
            x = x[None]
        kw = {"antialias": antialias, "align_corners": False} if mode != "nearest" else {}
        out = torch.nn.functional.interpolate(x, size=(size.height, size.width), mode=mode, **kw)
        if squeeze:
            out = out[0]
        if orig_dtype == torch.uint8:
            out = out.round().clamp(0, 255).to(torch.uint8)
        return out

    def normalize(self, image: torch.Tensor, mean: Any, std: Any, inplace: bool = False, **kwargs) -> torch.Tensor:
        """``(image - mean) / std`` per channel on ``(..., C, H, W)``."""
        if is_torchvision_available():
            return super().normalize(image, mean, std, inplace=inplace, **kwargs)
        mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        return (image - mean_t) / std_t
