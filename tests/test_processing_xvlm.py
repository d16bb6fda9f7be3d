"""Tests for boxes / region masks, text cleaning, the tokenizer conventions, XVLMProcessor, masking and collators."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from modeling_xvlm.box_ops import box_convert
from modeling_xvlm.processing import (
    XVLMImageProcessorPil,
    XVLMProcessor,
    pre_caption,
    pre_question,
    region_mask_from_box,
    region_masks_from_boxes,
    validate_and_clip_box,
)
from modeling_xvlm.training import (
    XVLMGroundingCollator,
    XVLMPretrainCollator,
    XVLMRegionSampler,
    XVLMTextMasker,
    mentions_left_right,
)


@pytest.fixture
def processor(tiny_tokenizer) -> XVLMProcessor:
    """Model input 64 x 64 with total stride 32: a 2 x 2 patch grid (P = 4)."""
    return XVLMProcessor(XVLMImageProcessorPil(size={"height": 64, "width": 64}, patch_size=32), tiny_tokenizer)


def img(h: int = 48, w: int = 64) -> Image.Image:
    return Image.new("RGB", (w, h), (10, 20, 30))


# ------------------------------------------------------------------ region masks (official get_image_attns)


@pytest.mark.parametrize(
    "box,size,expected",
    [
        ((0, 0, 64, 64), 64, [1, 1, 1, 1, 1]),  # whole image
        ((40, 5, 10, 10), 64, [1, 0, 1, 0, 0]),  # inside one patch (row 0, col 1)
        ((32, 0, 32, 32), 64, [1, 0, 1, 0, 0]),  # exactly one patch, edges on the grid
        ((0, 0, 33, 32), 64, [1, 1, 1, 0, 0]),  # one pixel over the boundary -> ceil takes the next column
        ((64, 64, 0, 0), 64, [1, 0, 0, 0, 1]),  # on the far corner: clamped to the last patch, at least one cell
        ((31.9, 31.9, 0.2, 0.2), 64, [1, 1, 1, 1, 1]),  # tiny box across the centre touches all four patches
        ((40, 40, 50, 20), (64, 96), [1, 0, 0, 0, 0, 1, 1]),  # non-square input: 2 x 3 grid, row-major
        ((0, 0, 10, 70), (64, 96), [1, 1, 0, 0, 1, 0, 0]),  # taller than the image: clipped to the grid
    ],
)
def test_region_mask_hand_computed(box, size, expected) -> None:
    assert region_mask_from_box(*box, image_size=size, patch_size=32) == expected
    assert region_masks_from_boxes([box], size, 32).tolist() == [expected]


def test_region_mask_official_224_grid() -> None:
    # 224 / 32 = 7: box (100, 50, 60, 30) -> columns floor(100/32)=3 .. ceil(160/32)=5 (excl), rows 1 .. ceil(80/32)=3
    mask = region_mask_from_box(100, 50, 60, 30, image_size=224, patch_size=32)
    on = [i - 1 for i, v in enumerate(mask) if v and i > 0]
    assert on == [7 * r + c for r in (1, 2) for c in (3, 4)] and mask[0] == 1 and len(mask) == 50
    with pytest.raises(ValueError, match="multiples of patch_size"):
        region_mask_from_box(0, 0, 1, 1, image_size=100, patch_size=32)


# ------------------------------------------------------------------ boxes: validation and round trips


def test_validate_and_clip() -> None:
    torch.testing.assert_close(
        validate_and_clip_box([-10, -10, 30, 30], (48, 64), "xywh"), torch.tensor([0.0, 0.0, 20.0, 20.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        validate_and_clip_box([50, 40, 90, 70], (48, 64), "xyxy"), torch.tensor([50.0, 40.0, 64.0, 48.0], dtype=torch.float64)
    )
    bad = [
        ([0, 0, -1, 5], "xywh", "negative width or height"),
        ([10, 0, 5, 5], "xyxy", "negative width or height"),
        ([float("nan"), 0, 5, 5], "xywh", "NaN"),
        ([100, 100, 10, 10], "xywh", "no area left"),
        ([5, 5, 0, 10], "xywh", "no area left"),
        ([1, 2, 3], "xywh", "exactly 4"),
    ]
    for box, fmt, message in bad:
        with pytest.raises(ValueError, match=rf"boxes\[3\].*{message}"):
            validate_and_clip_box(box, (48, 64), fmt, name="boxes[3]")


def test_processor_boxes_formats_round_trip(processor) -> None:
    image = img(48, 64)  # H = 48, W = 64; model input 64 x 64
    xywh = torch.tensor([[8.0, 12.0, 24.0, 18.0], [32.0, 24.0, 32.0, 24.0]], dtype=torch.float64)
    outs = {}
    for fmt in ("xywh", "xyxy", "cxcywh"):
        boxes = box_convert(xywh, "xywh", fmt).tolist()
        outs[fmt] = processor(images=image, text=["a dog", "a cat"], boxes=boxes, box_format=fmt)
    for fmt in ("xyxy", "cxcywh"):
        torch.testing.assert_close(outs[fmt]["labels"], outs["xywh"]["labels"], rtol=0, atol=0)
        assert torch.equal(outs[fmt]["region_masks"], outs["xywh"]["region_masks"])
    out = outs["xywh"]
    # normalised cxcywh: (x + w/2)/W, (y + h/2)/H, w/W, h/H
    expected = torch.tensor([[20 / 64, 21 / 48, 24 / 64, 18 / 48], [48 / 64, 36 / 48, 0.5, 0.5]])
    torch.testing.assert_close(out["labels"], expected)
    # second box -> resized (32, 32, 32, 32) -> bottom-right patch only; first -> resized (8, 16, 24, 24): rows 0-1, col 0
    assert out["region_masks"].tolist() == [[1, 1, 0, 1, 0], [1, 0, 0, 0, 1]]
    assert out["image_index"].tolist() == [0, 0]
    # post-processing inverts the normalisation (xyxy and xywh, original pixels)
    back = processor.post_process_grounding(out["labels"], target_sizes=[(48, 64), (48, 64)], box_format="xywh")
    torch.testing.assert_close(torch.cat([b["boxes"] for b in back]), xywh.float())
    back_xyxy = processor.post_process_grounding(
        {"pred_boxes": out["labels"]}, target_sizes=torch.tensor([[48, 64], [48, 64]])
    )
    torch.testing.assert_close(torch.cat([b["boxes"] for b in back_xyxy]), box_convert(xywh, "xywh", "xyxy").float())


def test_processor_clips_and_whole_image_entries(processor) -> None:
    out = processor(images=[img(), img(32, 32)], text=[["a dog", "the cat"], ["a man"]],
                    boxes=[[[-10, -10, 30, 30], None], [[0, 0, 32, 32]]])
    torch.testing.assert_close(out["labels"][0], torch.tensor([10 / 64, 10 / 48, 20 / 64, 20 / 48]))
    torch.testing.assert_close(out["labels"][1:], torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2))
    assert out["region_masks"][1].tolist() == [1] * 5 and out["region_masks"][2].tolist() == [1] * 5
    assert out["image_index"].tolist() == [0, 0, 1]
    assert out["pixel_values"].shape == (2, 3, 64, 64)


def test_processor_box_errors(processor) -> None:
    with pytest.raises(ValueError, match=r"boxes\[0\]\[1\].*no area left"):
        processor(images=[img()], text=[["a", "b"]], boxes=[[[0, 0, 5, 5], [100, 100, 5, 5]]])
    with pytest.raises(ValueError, match=r"boxes\[1\].*negative"):
        processor(images=img(), text=["a", "b"], boxes=[[0, 0, 5, 5], [0, 0, 5, -5]])
    with pytest.raises(ValueError, match=r"boxes\[0\].*NaN"):
        processor(images=img(), text=["a"], boxes=[[float("nan"), 0, 5, 5]])
    with pytest.raises(ValueError, match=r"boxes\[0\]: image 0 has 2 texts but 1 boxes"):
        processor(images=[img(), img()], text=[["a", "b"], ["c"]], boxes=[[[0, 0, 5, 5]], [[0, 0, 5, 5]]])
    with pytest.raises(ValueError, match="3 boxes for 2 images"):
        processor(images=[img(), img()], boxes=[[0, 0, 5, 5]] * 3)
    with pytest.raises(ValueError, match="box_format"):
        processor(images=img(), text="a", boxes=[[0, 0, 5, 5]], box_format="yxhw")


# ------------------------------------------------------------------ text


def test_pre_caption_and_question() -> None:
    assert pre_caption("  A Dog's  ball!  (red)-and/blue  <person>\n") == "a dogs ball red and blue person"
    assert pre_caption(" ".join(["w"] * 40)) == " ".join(["w"] * 30)
    with pytest.raises(ValueError, match="empty"):
        pre_caption("?!.")
    assert pre_question("What's on the left-side?  ") == "whats on the left side"
    assert pre_question("a  b") == "a  b"  # no whitespace collapsing, as officially


def test_tokenizer_conventions(processor, tiny_tokenizer) -> None:
    out = processor(text=["A red dog!", "the cat"])
    ids = out["input_ids"].tolist()
    cls, sep = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    # no [SEP], text cleaned and lower-cased, padded with [PAD] = 0 to the longest
    assert ids[0] == [cls] + tiny_tokenizer.convert_tokens_to_ids(["a", "red", "dog"])
    assert ids[1] == [cls] + tiny_tokenizer.convert_tokens_to_ids(["the", "cat"]) + [0]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert sep not in sum(ids, []) and "image_index" not in out and "pixel_values" not in out
    with_sep = processor(text="a dog", add_sep=True)["input_ids"][0].tolist()
    assert with_sep == [cls, *tiny_tokenizer.convert_tokens_to_ids(["a", "dog"]), sep]
    # truncation keeps max_length - 1 text tokens ([CLS] included in max_length)
    assert processor(text=" ".join(["dog"] * 60))["input_ids"].shape == (1, 31)  # pre_caption keeps 30 words
    long = processor(text=" ".join(["dog"] * 60), text_preprocessing=None)["input_ids"]
    assert long.shape == (1, 40) and long[0, 0] == cls and long[0, -1] == tiny_tokenizer.convert_tokens_to_ids("dog")
    assert processor(text="a dog", padding="max_length")["input_ids"].shape == (1, 40)
    assert processor(text="A Dog", text_preprocessing=None)["input_ids"].shape == (1, 3)
    with pytest.raises(ValueError, match=r"text\[1\].*empty"):
        processor(text=["a dog", "!!"])


def test_texts_per_image_and_image_index(processor) -> None:
    out = processor(images=[img(), img()], text=["a dog", "a cat"])
    assert "image_index" not in out and out["input_ids"].shape[0] == 2
    out = processor(images=img(), text=["a dog", "a cat", "a man"])
    assert out["image_index"].tolist() == [0, 0, 0]
    out = processor(images=[img(), img()], text=["a dog", "a cat", "a man"], image_index=[1, 0, 1])
    assert out["image_index"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="3 texts for 2 images"):
        processor(images=[img(), img()], text=["a", "b", "c"])
    with pytest.raises(ValueError, match="out of range"):
        processor(images=[img()], text=["a", "b"], image_index=[0, 1])


def test_save_load_and_auto_processor(processor, tmp_path) -> None:
    processor.add_sep = True
    processor.max_length = 12
    processor.save_pretrained(tmp_path)
    loaded = XVLMProcessor.from_pretrained(tmp_path)
    assert loaded.add_sep and loaded.max_length == 12 and loaded.image_processor.patch_size == 32
    assert loaded.image_processor.input_size == (64, 64)
    a = processor(images=img(), text="a red dog", boxes=[[1, 2, 30, 20]])
    b = loaded(images=img(), text="a red dog", boxes=[[1, 2, 30, 20]])
    for key in a:
        assert torch.equal(a[key], b[key]), key
    pytest.importorskip("modeling_xvlm.configuration_xvlm")
    from transformers import AutoProcessor

    auto = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(auto, XVLMProcessor) and auto.max_length == 12


# ------------------------------------------------------------------ MLM masking


def test_masking_statistics(tiny_tokenizer) -> None:
    masker = XVLMTextMasker(tiny_tokenizer, seed=0)
    words = ["dog", "cat", "man", "red", "blue", "run", "walk", "small", "big", "the"]
    rng = np.random.default_rng(0)
    n_rows = 1500  # rows of [CLS] + 20 words (length 21) -> n_pred = min(8, round(21 * 0.25)) = 5
    rows = [[tiny_tokenizer.cls_token_id] + tiny_tokenizer.convert_tokens_to_ids(list(rng.choice(words, 20)))
            for _ in range(n_rows)]
    ids = torch.tensor([r + [0, 0] for r in rows])  # two padding positions
    att = (torch.arange(23) < 21).long().expand(n_rows, -1)
    mlm_ids, labels = masker(ids, att)
    masked = labels != -100
    assert masked.sum(1).tolist() == [5] * n_rows
    assert not masked[:, 0].any() and not masked[:, 21:].any()
    assert torch.equal(labels[masked], ids[masked])
    assert torch.equal(mlm_ids[~masked], ids[~masked])
    total = masked.sum().item()
    frac_mask = (mlm_ids[masked] == tiny_tokenizer.mask_token_id).float().mean().item()
    frac_same = (mlm_ids[masked] == ids[masked]).float().mean().item()
    v = len(tiny_tokenizer)
    assert abs(frac_mask - (0.8 + 0.1 / v)) < 0.02  # a random draw can be [MASK] too
    assert abs(frac_same - (0.1 + 0.1 / v)) < 0.015
    assert total == 5 * n_rows
    # max_masks caps long texts; short texts get at least one mask
    long_ids = torch.tensor([[2] + [tiny_tokenizer.convert_tokens_to_ids("dog")] * 39])
    assert (XVLMTextMasker(tiny_tokenizer, seed=1)(long_ids)[1] != -100).sum() == 8
    short_ids = torch.tensor([[2, tiny_tokenizer.convert_tokens_to_ids("dog")]])
    assert (XVLMTextMasker(tiny_tokenizer, seed=1)(short_ids)[1] != -100).sum() == 1


def test_masking_deterministic_and_whole_word(tiny_tokenizer) -> None:
    ids = torch.tensor([tiny_tokenizer.convert_tokens_to_ids(["[CLS]", "a", "run", "##ing", "##s", "the"])] * 400)
    a = XVLMTextMasker(tiny_tokenizer, seed=7)(ids)
    b = XVLMTextMasker(tiny_tokenizer, seed=7)(ids)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    m = XVLMTextMasker(tiny_tokenizer, mask_prob=0.5, skipgram_prb=0.0, seed=3)  # n_pred = 3
    tokens = tiny_tokenizer.convert_ids_to_tokens(ids[0].tolist())
    special = [True] + [False] * 5
    seen_word = 0
    for _ in range(500):
        pos = set(m.choose_positions(tokens, special))
        assert len(pos) == 3 and 0 not in pos
        if pos & {2, 3, 4} and not pos & {1, 5}:
            assert pos == {2, 3, 4}  # whole word, never a fragment alone
            seen_word += 1
    assert seen_word > 50


# ------------------------------------------------------------------ region sampler and collators


def test_mentions_left_right() -> None:
    assert mentions_left_right(["the bright sky"], "substring") and not mentions_left_right(["the bright sky"])
    assert mentions_left_right(["Leftmost dog"]) and mentions_left_right(["a", "dog on the right"])
    assert not mentions_left_right(["an upright man", "alright"])


def test_region_sampler_boxes() -> None:
    image = img(48, 64)  # W = 64, H = 48
    objects = [{"bbox": [8, 12, 16, 24], "caption": "a dog"}]
    sampler = XVLMRegionSampler(image_size=32, crop=False, hflip_prob=0.0, seed=0)
    out, entries = sampler(image, "a picture", objects)
    assert out.size == (32, 32)
    assert entries == [("a picture", [0.0, 0.0, 32.0, 32.0], 1), ("a dog", [4.0, 8.0, 8.0, 16.0], 0)]
    flipper = XVLMRegionSampler(image_size=32, crop=False, hflip_prob=1.0, seed=0)
    assert flipper(image, None, objects)[1] == [("a dog", [20.0, 8.0, 8.0, 16.0], 0)]  # x = (64 - 8) - 16 = 40
    left = [{"bbox": [8, 12, 16, 24], "caption": "the left dog"}]
    assert flipper(image, None, left)[1][0][1][0] == 4.0  # careful flip: not flipped
    bright = [{"bbox": [8, 12, 16, 24], "caption": "a bright dog"}]
    assert flipper(image, None, bright)[1][0][1][0] == 20.0  # word test: flipped
    official = XVLMRegionSampler(image_size=32, crop=False, hflip_prob=1.0, left_right_test="substring")
    assert official(image, None, bright)[1][0][1][0] == 4.0
    # min_perc_in_image: half outside (8/16 = 0.5, not > 0.5) is dropped; 12/16 kept and clipped
    part = [{"bbox": [56, 0, 16, 10], "caption": "a"}, {"bbox": [52, 0, 16, 10], "caption": "b"}]
    ents = sampler(image, None, part)[1]
    assert ents == [("b", [26.0, 0.0, 6.0, 10 * 32 / 48], 0)]
    # attributes, max_regions
    many = [{"bbox": [i, i, 8, 8], "caption": "dog", "attributes": ["red"]} for i in range(10)]
    ents = sampler(image, ["a picture"], many)[1]
    assert len(ents) == 5 and ents[0][2] == 1 and all(e[0] == "red dog" for e in ents[1:])


def test_region_sampler_crop_keeps_anchor() -> None:
    sampler = XVLMRegionSampler(image_size=32, hflip_prob=0.0, seed=0)
    image = img(48, 64)
    for _ in range(30):
        _, entries = sampler(image, None, [{"bbox": [20, 10, 16, 20], "caption": "dog"}])
        assert len(entries) == 1  # the only object is the anchor: always fully inside the crop
        x, y, w, h = entries[0][1]
        assert 0 <= x and 0 <= y and x + w <= 32 + 1e-9 and y + h <= 32 + 1e-9


def test_pretrain_collator(processor) -> None:
    collator = XVLMPretrainCollator(processor, region_sampler=XVLMRegionSampler(64, crop=False, seed=0), seed=0)
    rows = [
        {"image": img(), "caption": "a dog on the left"},
        {"image": img(40, 40), "caption": ["a picture", "a photo"],
         "objects": [{"bbox": [0, 0, 20, 20], "caption": "the cat"}, {"bbox": [20, 20, 20, 20], "caption": "a man"}]},
        {"image": img(), "caption": None, "objects": []},  # no texts: dropped
    ]
    batch = collator(rows)
    n = batch["input_ids"].shape[0]
    assert n == 4 and batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["image_index"].tolist() == [0, 1, 1, 1]
    assert batch["is_image"].tolist()[:2] == [1, 1] and sorted(batch["is_image"].tolist()[2:]) == [0, 0]
    assert batch["region_masks"].shape == (4, 5) and batch["region_masks"][:2].eq(1).all()
    torch.testing.assert_close(batch["labels"][:2], torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2))
    assert batch["mlm_labels"].shape == batch["input_ids"].shape == batch["mlm_input_ids"].shape
    masked = batch["mlm_labels"] != -100
    assert masked.sum(1).ge(1).all() and torch.equal(batch["mlm_labels"][masked], batch["input_ids"][masked])
    for key, dtype in [("input_ids", torch.long), ("mlm_labels", torch.long), ("is_image", torch.long),
                       ("region_masks", torch.long), ("labels", torch.float32), ("image_index", torch.long)]:
        assert batch[key].dtype == dtype, key
    padded = XVLMPretrainCollator(processor, max_texts=6, pad_with_duplicates=True, seed=0)(rows)
    assert padded["input_ids"].shape[0] == 6
    sampled = XVLMPretrainCollator(processor, max_texts=2, seed=0)(rows)
    assert sampled["input_ids"].shape[0] == 2


def test_grounding_collator(processor) -> None:
    collator = XVLMGroundingCollator(processor, return_target_sizes=True)
    batch = collator([{"image": img(), "text": "the dog", "bbox": [8, 12, 24, 18]},
                      {"image": img(32, 32), "text": "a cat", "bbox": [0, 0, 16, 16]}])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels", "target_sizes"}
    torch.testing.assert_close(batch["labels"], torch.tensor([[20 / 64, 21 / 48, 24 / 64, 18 / 48], [0.25, 0.25, 0.5, 0.5]]))
    assert batch["target_sizes"].tolist() == [[48, 64], [32, 32]]


# ----------------------------------------------------------------------------------------------------------------
# Image pairs (NLVR2)
# ----------------------------------------------------------------------------------------------------------------


def test_processor_image_pairs_shape_and_order(processor) -> None:
    left, right = img(48, 64), Image.new("RGB", (32, 40), (200, 100, 0))
    out = processor(images=[(left, right), [right, left]], text=["a dog", "a cat"])
    assert tuple(out["pixel_values"].shape) == (2, 2, 3, 64, 64)
    assert tuple(out["input_ids"].shape[:1]) == (2,) and "image_index" not in out
    single = processor(images=[left, right])["pixel_values"]
    assert torch.equal(out["pixel_values"][0], single) and torch.equal(out["pixel_values"][1], single.flip(0))
    # a single pair and a single sentence
    assert tuple(processor(images=[(left, right)], text="a dog")["pixel_values"].shape) == (1, 2, 3, 64, 64)


def test_processor_image_pairs_errors(processor) -> None:
    a = img()
    with pytest.raises(ValueError, match=r"images\[0\] has 1 images: each pair must have exactly two"):
        processor(images=[(a,)], text=["a dog"])
    with pytest.raises(ValueError, match=r"images\[1\] has 3 images"):
        processor(images=[(a, a), (a, a, a)], text=["a dog", "a cat"])
    with pytest.raises(ValueError, match="2 sentences for 1 image pairs"):
        processor(images=[(a, a)], text=["a dog", "a cat"])
    with pytest.raises(ValueError, match="one str per pair"):
        processor(images=[(a, a)], text=[["a dog"]])
    with pytest.raises(ValueError, match=r"images\[0\] is a single image"):
        processor(images=[a, (a, a)], text=["a dog", "a cat"])


# ------------------------------------------------------------------ captioning (official model_captioning.py)


def _official_caption_batch(tokenizer, captions, prompt="a picture of ", max_tokens=40):
    """The official training inputs, computed with the tokenizer's own call: `coco_karpathy_train` builds
    `prompt + pre_caption(caption, max_tokens)`, `model_captioning.forward` tokenises with
    `padding='longest', truncation=True, max_length=max_tokens` and masks padding and `prompt_length` tokens."""
    texts = [prompt + pre_caption(c, max_tokens) for c in captions]
    # padding_side: the official BertTokenizer pads right (the shared test tokenizer may have been switched to left
    # padding by transformers' image-text-to-text pipeline, which does so for decoder models since 5.25)
    text = tokenizer(texts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt",
                     padding_side="right")
    prompt_length = len(tokenizer(prompt).input_ids) - 1
    targets = text.input_ids.masked_fill(text.input_ids == tokenizer.pad_token_id, -100)
    targets[:, :prompt_length] = -100
    return text.input_ids, text.attention_mask, targets, prompt_length


CAPTIONS = ["A red Dog, on the left!", "the cat", " ".join(["dogs"] * 45)]  # the last: 40 words, truncated tokens


def test_encode_captions_is_the_official_batch(processor, tiny_tokenizer) -> None:
    from modeling_xvlm.modeling_xvlm_captioning import CAPTION_PROMPT as MODEL_PROMPT
    from modeling_xvlm.modeling_xvlm_captioning import caption_labels
    from modeling_xvlm.processing import CAPTION_PROMPT

    assert CAPTION_PROMPT == MODEL_PROMPT == processor.prompt == "a picture of "
    batch = processor.encode_captions(CAPTIONS)
    ids, mask, targets, prompt_length = _official_caption_batch(tiny_tokenizer, CAPTIONS)
    assert prompt_length == processor.caption_prompt_length() == 4
    assert batch["input_ids"].shape == (3, 40) and batch["input_ids"][2, -1] == tiny_tokenizer.sep_token_id
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert batch["labels"].dtype == torch.long and torch.equal(batch["labels"], targets)
    # the head's own target rule gives the same labels
    assert torch.equal(batch["labels"], caption_labels(ids, mask, prompt_length=4))
    cls, sep = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    words = tiny_tokenizer.convert_tokens_to_ids(["a", "picture", "of", "the", "cat"])
    assert batch["input_ids"][1, :7].tolist() == [cls, *words, sep]
    assert batch["labels"][1, :8].tolist() == [-100] * 4 + words[3:] + [sep, -100]


def test_encode_captions_options(processor, tiny_tokenizer) -> None:
    # the captioning domain pre-training: no prompt, `[CLS] caption [SEP]`, only [CLS] unlabelled
    bare = processor.encode_captions(["a dog", "the red cat"], prompt="")
    ids, mask, targets, prompt_length = _official_caption_batch(tiny_tokenizer, ["a dog", "the red cat"], prompt="")
    assert prompt_length == 1 and torch.equal(bare["input_ids"], ids) and torch.equal(bare["labels"], targets)
    assert torch.equal(bare["attention_mask"], mask)
    # a processor prompt is the default of every caption method
    processor.prompt = "a photo of "
    photo = processor.encode_captions(["a dog"])
    assert torch.equal(photo["input_ids"], _official_caption_batch(tiny_tokenizer, ["a dog"], "a photo of ")[0])
    assert processor.caption_prompt(1)[0].tolist() == tiny_tokenizer("a photo of ").input_ids[:-1]
    processor.prompt = "a picture of "
    # max_length (and max_words, by default the same, as the official max_tokens), padding, numpy / lists
    short = processor.encode_captions(CAPTIONS, max_length=12)
    assert torch.equal(short["input_ids"], _official_caption_batch(tiny_tokenizer, CAPTIONS, max_tokens=12)[0])
    words = processor.encode_captions(["dog cat man woman"], max_words=2)
    assert words["input_ids"][0].tolist() == tiny_tokenizer("a picture of dog cat").input_ids
    padded = processor.encode_captions(["a dog"], padding="max_length")
    assert padded["input_ids"].shape == (1, 40) and (padded["labels"][0, 7:] == -100).all()
    as_np = processor.encode_captions(["a dog"], return_tensors="np")
    assert isinstance(as_np["labels"], np.ndarray) and as_np["labels"].tolist() == padded["labels"][:, :7].tolist()
    a_dog = tiny_tokenizer.convert_tokens_to_ids(["a", "dog"])
    assert processor.encode_captions(["a dog"], return_tensors=None)["labels"] == [[-100] * 4 + a_dog + [3]]
    ragged = processor.encode_captions(["a dog", "the red cat"], padding=False)  # no padding: unequal lists
    red_cat = tiny_tokenizer.convert_tokens_to_ids(["the", "red", "cat"])
    assert ragged["labels"] == [[-100] * 4 + a_dog + [3], [-100] * 4 + red_cat + [3]]


def test_encode_captions_errors(processor) -> None:
    with pytest.raises(ValueError, match=r"captions\[1\].*empty"):
        processor.encode_captions(["a dog", "?!"])
    with pytest.raises(ValueError, match="non-empty list"):
        processor.encode_captions("a dog")
    with pytest.raises(ValueError, match="non-empty list"):
        processor.encode_captions([])
    with pytest.raises(ValueError, match="max_length=5 leaves no token for the caption"):
        processor.encode_captions(["a dog"], max_length=5)
    with pytest.raises(ValueError, match="prompt must be a str"):
        processor.encode_captions(["a dog"], prompt=3)
    with pytest.raises(ValueError, match="prompt must be a str"):
        XVLMProcessor(processor.image_processor, processor.tokenizer, prompt=None)


def test_caption_prompt_is_the_official_generation_prompt(processor, tiny_tokenizer) -> None:
    prompt = processor.caption_prompt(3)
    official = tiny_tokenizer(["a picture of "] * 3, return_tensors="pt").input_ids[:, :-1]  # drops [SEP]
    assert prompt.dtype == torch.long and torch.equal(prompt, official) and prompt.shape == (3, 4)
    assert processor.caption_prompt(prompt="")[0].tolist() == [tiny_tokenizer.cls_token_id]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            processor.caption_prompt(bad)


def _official_captions(tokenizer, rows, prompt="a picture of "):
    """Official `_get_captions`: `tokenizer.decode(output, skip_special_tokens=True)[len(prompt):]`."""
    return [tokenizer.decode(row, skip_special_tokens=True)[len(prompt):] for row in rows]


def test_post_process_captions_is_the_official_decoding(processor, tiny_tokenizer) -> None:
    prompt = processor.caption_prompt(1)[0].tolist()
    sep = tiny_tokenizer.sep_token_id
    words = tiny_tokenizer.convert_tokens_to_ids
    rows = [
        prompt + words(["a", "red", "dog"]) + [sep],
        prompt + words(["the", "cat", "run", "##ing"]) + [sep, 0, 0],  # padded, a word piece
        prompt + [sep] + [0] * 3,  # an empty caption
    ]
    width = max(len(r) for r in rows)
    generated = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    captions = processor.post_process_captions(generated)
    assert captions == [c.strip() for c in _official_captions(tiny_tokenizer, generated.tolist())]
    assert captions == ["a red dog", "the cat runing", ""]
    assert processor.post_process_captions(generated[1]) == ["the cat runing"]  # one sequence
    assert processor.post_process_captions(generated.tolist()) == captions

    class Output:  # what generate(..., return_dict_in_generate=True) returns
        sequences = generated

    assert processor.post_process_captions(Output()) == captions
    # no prompt: the whole text (domain pre-training captions)
    bare = [[2, *words(["a", "dog"]), sep]]
    assert processor.post_process_captions(bare, prompt="") == ["a dog"]
    # a prompt word outside the vocabulary decodes to nothing: its tokens are cut instead of its characters
    unknown = processor.caption_prompt(1, prompt="a snapshot of ")[0].tolist()
    assert tiny_tokenizer.unk_token_id in unknown
    assert processor.post_process_captions([unknown + words(["a", "dog"]) + [sep]], prompt="a snapshot of ") == [
        "a dog"
    ]
    with pytest.raises(ValueError, match="generated_ids must be token ids"):
        processor.post_process_captions(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="generated_ids must be token ids"):
        processor.post_process_captions([["a", "b"]])


def test_post_process_image_text_to_text_cuts_the_caption_prompt(processor, tiny_tokenizer) -> None:
    """transformers' image-text-to-text pipeline decodes the generated ids and the prompt ids with this method."""
    prompt = processor.caption_prompt(1)[0].tolist()
    words = tiny_tokenizer.convert_tokens_to_ids
    sep = tiny_tokenizer.sep_token_id
    caption = torch.tensor([prompt + words(["a", "dog"]) + [sep]])
    question = torch.tensor([[2, *words(["the", "picture", "of", "a", "dog"])]])  # not the prompt
    answer = torch.tensor([[2, *words(["red"]), sep]])
    assert processor.post_process_image_text_to_text(caption) == ["a dog"]
    assert processor.post_process_image_text_to_text(torch.tensor([prompt])) == [""]  # the pipeline's prompt
    assert processor.post_process_image_text_to_text(question) == ["the picture of a dog"]
    assert processor.post_process_image_text_to_text(answer) == ["red"]
    assert processor.post_process_image_text_to_text(caption[0]) == "a dog"  # one sequence: one str
    # a word piece right after the prompt: the official character cut, as post_process_captions
    piece = torch.tensor([prompt + words(["##er", "dog"]) + [sep]])
    assert processor.post_process_image_text_to_text(piece) == processor.post_process_captions(piece) == ["r dog"]
    # with the special tokens the text does not start with the prompt: left as decoded
    assert processor.post_process_image_text_to_text(caption, skip_special_tokens=False) == [
        "[CLS] a picture of a dog [SEP]"
    ]
    processor.prompt = ""
    assert processor.post_process_image_text_to_text(caption) == ["a picture of a dog"]


def test_caption_prompt_survives_save_and_load(processor, tmp_path) -> None:
    processor.prompt = "a photo of "
    processor.save_pretrained(tmp_path)
    assert XVLMProcessor.from_pretrained(tmp_path).prompt == "a photo of "
    processor.prompt = "a picture of "
    processor.save_pretrained(tmp_path / "default")
    assert XVLMProcessor.from_pretrained(tmp_path / "default").prompt == "a picture of "


def test_post_process_grounded_object_detection_inverts_prepare_boxes(processor) -> None:
    """The OWL-ViT / Grounding DINO format on the processor: the boxes `processor(boxes=...)` normalised come back
    in pixels (xyxy), one dict per (image, text) row, with the row's text."""
    xywh = torch.tensor([[8.0, 12.0, 24.0, 18.0], [32.0, 24.0, 32.0, 24.0]])
    out = processor(images=[img(), img()], text=["a dog", "the cat"], boxes=xywh.tolist())
    results = processor.post_process_grounded_object_detection(
        {"pred_boxes": out["labels"]}, target_sizes=[(48, 64), (48, 64)], text_labels=["a dog", "the cat"]
    )
    assert [sorted(r) for r in results] == [["boxes", "labels", "scores", "text_labels"]] * 2
    torch.testing.assert_close(torch.cat([r["boxes"] for r in results]), box_convert(xywh, "xywh", "xyxy"))
    legacy = processor.post_process_grounding(out["labels"], target_sizes=[(48, 64), (48, 64)])
    assert all(torch.equal(r["boxes"], b["boxes"]) for r, b in zip(results, legacy))
    assert [r["text_labels"] for r in results] == [["a dog"], ["the cat"]]
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_grounded_object_detection(out["labels"], target_sizes=[(48, 64)])
