"""Tests for the X-VLM image processors (PIL parity backend and tensor backend) and input conversion."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_xvlm.processing import XVLMImageProcessor, XVLMImageProcessorPil, load_image_rgb

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def official_pixels(image: Image.Image, size: int) -> np.ndarray:
    """Official test_transform: Resize((s, s), BICUBIC) on the PIL image -> ToTensor -> Normalize(CLIP)."""
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    return ((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def pil_proc() -> XVLMImageProcessorPil:
    return XVLMImageProcessorPil(size={"height": 64, "width": 64})


def test_defaults() -> None:
    p = XVLMImageProcessorPil()
    assert (p.size["height"], p.size["width"]) == (384, 384)
    assert p.patch_size == 32 and p.num_patches == 144
    assert p.resample == Image.BICUBIC and p.do_convert_rgb
    np.testing.assert_allclose(p.image_mean, CLIP_MEAN)
    np.testing.assert_allclose(p.image_std, CLIP_STD)
    assert XVLMImageProcessor().patch_size == 32


def test_pil_backend_matches_official_pipeline(pil_proc, rgb_image) -> None:
    # rgb_image is 48 x 64 (H x W): the square resize does not keep the aspect ratio
    out = pil_proc(rgb_image, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 64, 64) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), official_pixels(rgb_image, 64), atol=1e-5)


def test_input_types_give_identical_pixels(pil_proc, rgb_image) -> None:
    arr = np.array(rgb_image)
    ref = pil_proc(rgb_image, return_tensors="pt")["pixel_values"]
    inputs = [
        arr,  # HWC uint8
        torch.from_numpy(arr).permute(2, 0, 1),  # CHW uint8
        torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0,  # CHW float in [0, 1]
        arr.astype(np.float32),  # HWC float in [0, 255]
    ]
    for x in inputs:
        torch.testing.assert_close(pil_proc(x, return_tensors="pt")["pixel_values"], ref)
    batch = torch.from_numpy(np.stack([arr, arr])).permute(0, 3, 1, 2)
    out = pil_proc(batch, return_tensors="pt")["pixel_values"]
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out[1:], ref)


def test_modes_are_converted(pil_proc) -> None:
    gray = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) % 256
    gray8 = gray.astype(np.uint8)
    ref = pil_proc(Image.fromarray(gray8, "L"), return_tensors="pt")["pixel_values"]
    # 16-bit grayscale (full range): value v*257 maps back to v exactly
    i16 = Image.fromarray(gray8.astype(np.uint16) * 257)
    assert i16.mode.startswith("I;16")
    torch.testing.assert_close(pil_proc(i16, return_tensors="pt")["pixel_values"], ref)
    i32 = Image.fromarray(gray8.astype(np.int32) * 257)
    assert i32.mode == "I"
    torch.testing.assert_close(pil_proc(i32, return_tensors="pt")["pixel_values"], ref)
    f = Image.fromarray(gray8.astype(np.float32) / 255.0)
    assert f.mode == "F"
    torch.testing.assert_close(pil_proc(f, return_tensors="pt")["pixel_values"], ref)
    # 16-bit RGB numpy
    rgb16 = np.repeat(gray8[..., None], 3, -1).astype(np.uint16) * 257
    torch.testing.assert_close(pil_proc(rgb16, return_tensors="pt")["pixel_values"], ref)
    # palette, CMYK, 1-bit, LA
    for im in (
        Image.fromarray(gray8, "L").convert("P"),
        Image.fromarray(gray8, "L").convert("CMYK"),
        Image.fromarray(gray8, "L").convert("1"),
        Image.fromarray(gray8, "L").convert("LA"),
    ):
        assert pil_proc(im, return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 64)


def test_rgba_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    out = np.asarray(load_image_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out[:2] == [200, 0, 0]).all() and (out[2:] == [255, 255, 255]).all()
    np.testing.assert_array_equal(np.asarray(load_image_rgb(rgba)), out)


def test_bad_inputs_name_the_image(pil_proc, rgb_image, tmp_path) -> None:
    bad_file = tmp_path / "broken.jpg"
    bad_file.write_bytes(b"not an image at all")
    buf = io.BytesIO()
    rgb_image.save(buf, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = [
        (Image.new("RGB", (0, 5)), "zero size"),
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
        (str(bad_file), "could not be read"),
        (str(truncated), "could not be read"),
        (str(tmp_path / "missing.png"), "could not be read"),
        (np.full((4, 4, 3), -1.0, np.float32), r"\[0, 1\] or \[0, 255\]"),
        (np.zeros((4, 4, 3), np.int64) - 3, "negative"),
        (np.zeros((5, 5, 7), np.uint8), "channel"),
        (12, "unsupported type"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=rf"images\[1\].*{message}"):
            pil_proc([rgb_image, bad])


def test_tensor_backend_works_without_torchvision(rgb_image) -> None:
    smooth = Image.fromarray(
        np.stack([*np.meshgrid(np.linspace(0, 255, 64), np.linspace(0, 255, 48)), np.full((48, 64), 128.0)], -1)
        .astype(np.uint8)
    )
    fast = XVLMImageProcessor(size={"height": 64, "width": 64})
    pil = XVLMImageProcessorPil(size={"height": 64, "width": 64})
    a = fast(smooth, return_tensors="pt")["pixel_values"]
    b = pil(smooth, return_tensors="pt")["pixel_values"]
    assert a.shape == b.shape == (1, 3, 64, 64)
    assert (a - b).abs().mean() < 0.02  # both bicubic; kernels differ slightly


def test_post_process_grounding_inverts_normalisation() -> None:
    p = XVLMImageProcessorPil()
    # original 480 x 640 (H x W) image, box xywh (64, 48, 320, 240) -> normalised cxcywh
    pred = torch.tensor([[(64 + 160) / 640, (48 + 120) / 480, 320 / 640, 240 / 480], [0.5, 0.5, 1.0, 1.0]])
    out = p.post_process_grounding({"pred_boxes": pred}, target_sizes=[(480, 640), (100, 200)])
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[64.0, 48.0, 384.0, 288.0]]))
    torch.testing.assert_close(out[1]["boxes"], torch.tensor([[0.0, 0.0, 200.0, 100.0]]))
    xywh = p.post_process_grounding(pred, target_sizes=torch.tensor([[480, 640], [100, 200]]), box_format="xywh")
    torch.testing.assert_close(xywh[0]["boxes"], torch.tensor([[64.0, 48.0, 320.0, 240.0]]))
    assert set(out[0]) == {"boxes"}
    with pytest.raises(ValueError, match="target_sizes"):
        p.post_process_grounding(pred, target_sizes=[(480, 640)])


# original 480 x 640 (H x W) image, box xywh (64, 48, 320, 240); 100 x 200 image, the whole image
KNOWN_PRED = torch.tensor([[(64 + 160) / 640, (48 + 120) / 480, 320 / 640, 240 / 480], [0.5, 0.5, 1.0, 1.0]])
KNOWN_XYXY = torch.tensor([[64.0, 48.0, 384.0, 288.0], [0.0, 0.0, 200.0, 100.0]])


@pytest.mark.parametrize("backend", [XVLMImageProcessorPil, XVLMImageProcessor])
def test_post_process_grounded_object_detection_format(backend) -> None:
    """The OWL-ViT / Grounding DINO list of dicts: one box per (image, text) row, pixel xyxy."""
    p = backend()
    sizes = [(480, 640), (100, 200)]
    out = p.post_process_grounded_object_detection(
        {"pred_boxes": KNOWN_PRED}, target_sizes=sizes, text_labels=["the man", ["a dog"]]
    )
    assert isinstance(out, list) and len(out) == 2
    for i, result in enumerate(out):
        assert set(result) == {"scores", "labels", "boxes", "text_labels"}
        assert result["boxes"].shape == (1, 4) and result["boxes"].dtype == torch.float32
        assert result["scores"].shape == (1,) and result["scores"].tolist() == [1.0]
        assert result["labels"].dtype == torch.long and result["labels"].tolist() == [0]
        torch.testing.assert_close(result["boxes"][0], KNOWN_XYXY[i])
        # the same numbers as the existing conversion
        torch.testing.assert_close(result["boxes"], p.post_process_grounding(KNOWN_PRED, target_sizes=sizes)[i]["boxes"])
    assert [r["text_labels"] for r in out] == [["the man"], ["a dog"]]
    # tensor target sizes; no text labels -> None (OWL-ViT); no target sizes -> normalised xyxy
    tensor_out = p.post_process_grounded_object_detection(KNOWN_PRED, target_sizes=torch.tensor(sizes))
    assert all(r["text_labels"] is None for r in tensor_out)
    torch.testing.assert_close(torch.cat([r["boxes"] for r in tensor_out]), KNOWN_XYXY)
    normalised = p.post_process_grounded_object_detection(KNOWN_PRED)
    torch.testing.assert_close(normalised[1]["boxes"], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    # threshold: the score is 1.0, so a threshold at or above it drops the box (empty, well-shaped tensors)
    dropped = p.post_process_grounded_object_detection(KNOWN_PRED, threshold=1.0, text_labels=["a", "b"])
    assert dropped[0]["boxes"].shape == (0, 4) and dropped[0]["scores"].shape == (0,)
    assert dropped[0]["text_labels"] == []
    # post_process_object_detection (what transformers' zero-shot-object-detection pipeline calls): same values
    detection = p.post_process_object_detection({"pred_boxes": KNOWN_PRED}, threshold=0.1, target_sizes=sizes)
    assert set(detection[0]) == {"scores", "labels", "boxes"}
    torch.testing.assert_close(detection[0]["boxes"], out[0]["boxes"])


@pytest.mark.parametrize(
    "target_sizes,match",
    [
        ([(480, 640)], "2 predicted boxes"),                       # wrong length vs batch
        (torch.tensor([[480, 640]]), "1 entries"),
        (torch.tensor([480, 640, 100, 200]), r"shape \(batch_size, 2\)"),  # flat: was silently reshaped
        (torch.zeros(2, 3), r"shape \(batch_size, 2\)"),
        ([(480, 640, 3), (100, 200, 3)], r"target_sizes\[0\] must be a \(height, width\) pair"),
        ([(480, 640), "100x200"], r"target_sizes\[1\]"),
        ([480, 640], r"target_sizes\[0\]"),                        # a flat pair for a batch of 2
        ([(480, 640), (0, 200)], "positive"),
        (torch.tensor([[480.0, 640.0], [float("nan"), 200.0]]), "positive"),
        ("480x640", "list of"),
        (640, "list of"),
    ],
)
def test_post_process_target_sizes_are_validated(target_sizes, match) -> None:
    p = XVLMImageProcessorPil()
    for method in (p.post_process_grounded_object_detection, p.post_process_object_detection,
                   p.post_process_grounding):
        with pytest.raises(ValueError, match=match):
            method(KNOWN_PRED, target_sizes=target_sizes)


def test_post_process_grounded_object_detection_bad_outputs_and_labels() -> None:
    p = XVLMImageProcessorPil()
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        p.post_process_grounded_object_detection(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="pred_boxes"):
        p.post_process_grounded_object_detection({"logits": KNOWN_PRED})
    with pytest.raises(ValueError, match="text_labels has 1 entries"):
        p.post_process_grounded_object_detection(KNOWN_PRED, text_labels=["a"])
    with pytest.raises(ValueError, match=r"text_labels\[1\] must be one str"):
        p.post_process_grounded_object_detection(KNOWN_PRED, text_labels=["a", ["b", "c"]])
    with pytest.raises(ValueError, match="one text per row"):
        p.post_process_grounded_object_detection(KNOWN_PRED, text_labels="a")


def test_save_load_round_trip(tmp_path) -> None:
    p = XVLMImageProcessorPil(size={"height": 224, "width": 224}, patch_size=16)
    p.save_pretrained(tmp_path)
    q = XVLMImageProcessorPil.from_pretrained(tmp_path)
    assert q.patch_size == 16 and q.input_size == (224, 224) and q.num_patches == 196
    r = XVLMImageProcessor.from_pretrained(tmp_path)
    assert r.patch_size == 16 and r.input_size == (224, 224)


def test_auto_image_processor(tmp_path) -> None:
    pytest.importorskip("modeling_xvlm.configuration_xvlm")
    from transformers import AutoImageProcessor

    XVLMImageProcessorPil(patch_size=16).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, XVLMImageProcessorPil) and loaded.patch_size == 16
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path, backend="torchvision"), XVLMImageProcessor)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_non_finite_images_are_rejected(bad, kind) -> None:
    array = np.full((16, 16, 3), 0.5, dtype=np.float32)
    array[3, 4, 1] = bad
    image = array if kind == "numpy" else torch.from_numpy(array).permute(2, 0, 1)
    for processor in (XVLMImageProcessorPil(), XVLMImageProcessor()):
        with pytest.raises(ValueError, match="NaN or infinite pixel values"):
            processor(images=[image], return_tensors="pt")
