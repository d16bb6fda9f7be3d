"""Benchmark cases 1-5: X-VLM-base shapes (Swin-B + BERT-base 6+6), random weights, fixed seed.

Each case builds its model and inputs once and exposes `run()`, one call of the measured work, whose output is
used to check bf16 against fp32. The attention kernel is switched with `set_attn_implementation` between calls.
`--quick` builds the same cases on the tiny preset (a smoke test of the harness, not a measurement).
"""

from __future__ import annotations

from typing import Any

import torch

from modeling_xvlm import XVLMConfig, XVLMModel

from .harness import Variant, cosine_min, max_abs

SEED = 0
CLS_ID, PAD_ID = 101, 0


def make_config(image_size: int, quick: bool) -> XVLMConfig:
    if quick:
        return XVLMConfig.from_preset("tiny")
    return XVLMConfig.from_preset("base", image_size=image_size)


def make_text(
    batch: int, length: int, vocab: int, min_length: int | None = None, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids `(batch, length)` starting with [CLS], padded after a random length in [min_length, length]."""
    generator = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 4)
    ids = torch.randint(low, vocab, (batch, length), generator=generator)
    ids[:, 0] = CLS_ID if vocab > CLS_ID else 2
    min_length = length if min_length is None else min_length
    lengths = torch.randint(min_length, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD_ID)
    return ids, mask


def make_pixels(batch: int, size: int, seed: int = SEED) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _heads_module():
    try:
        import modeling_xvlm as package

        return package
    except ImportError:  # pragma: no cover
        return None


def heads_available(name: str) -> bool:
    package = _heads_module()
    return package is not None and hasattr(package, name)


class Case:
    """One benchmark: `build()` the model and inputs, `run()` the measured work once."""

    key: str = ""
    title: str = ""
    number: str = ""
    items: int = 1  # images, texts or pairs per call (for the throughput column)
    unit: str = "items"
    training: bool = False
    max_repeats: int | None = None  # cap on timed rounds for slow cases
    needs: str | None = None  # a class name that must be importable from modeling_xvlm

    def __init__(self, quick: bool = False):
        self.quick = quick
        self.model: torch.nn.Module | None = None

    # to implement
    def build(self) -> None:
        raise NotImplementedError

    def forward(self) -> Any:
        raise NotImplementedError

    def compare(self, reference: Any, output: Any) -> dict[str, float]:
        raise NotImplementedError

    # shared
    def unavailable_reason(self) -> str | None:
        if self.needs and not heads_available(self.needs):
            return f"modeling_xvlm.{self.needs} is not available in this tree"
        return None

    def variants(self) -> list[Variant]:
        return [Variant(a, p) for p in ("fp32", "bf16") for a in ("eager", "sdpa")]

    def compile_variants(self) -> list[Variant]:
        return [Variant("sdpa", p, compile=True) for p in ("fp32", "bf16")]

    def set_attn(self, attn: str) -> None:
        if self.model.config._attn_implementation != attn:
            self.model.set_attn_implementation(attn)

    def callable_for(self, variant: Variant, compiled: Any = None):
        """A zero-argument function that runs the case once in `variant` and returns its output."""
        function = compiled if compiled is not None else self.forward

        def call() -> Any:
            self.set_attn(variant.attn)
            if self.training:
                self.set_checkpointing(variant.checkpointing)
                return function_with_autocast(function, variant)
            with torch.no_grad():
                return function_with_autocast(function, variant)

        return call

    def set_checkpointing(self, enabled: bool) -> None:
        if enabled and not self.model.is_activation_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif not enabled and self.model.is_activation_checkpointing:
            self.model.activation_checkpointing_disable()

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "number": self.number, "title": self.title, "items": self.items, "unit": self.unit}


def function_with_autocast(function, variant: Variant) -> Any:
    with variant.autocast():
        return function()


# -- 1. vision forward -----------------------------------------------------------------------------------------------


class VisionCase(Case):
    unit = "images"

    def __init__(self, image_size: int, batch: int, quick: bool = False):
        super().__init__(quick)
        self.image_size, self.batch = image_size, batch
        self.key = f"vision_{image_size}_b{batch}"
        self.number = "1"
        self.title = f"vision forward (Swin-B + ITC projection), batch {batch} @ {image_size}"
        self.items = batch

    def build(self) -> None:
        torch.manual_seed(SEED)
        config = make_config(self.image_size, self.quick)
        self.model = XVLMModel(config).eval()
        self.pixels = make_pixels(self.batch, config.image_size)

    def forward(self) -> torch.Tensor:
        return self.model.get_image_features(self.pixels).pooler_output

    def compare(self, reference, output) -> dict[str, float]:
        return {"itc_cosine_min": cosine_min(reference, output)}


# -- 2. text encoder -------------------------------------------------------------------------------------------------


class TextCase(Case):
    unit = "texts"

    def __init__(self, batch: int = 32, length: int = 30, quick: bool = False):
        super().__init__(quick)
        self.batch, self.length = batch, length
        self.key = f"text_b{batch}_l{length}"
        self.number = "2"
        self.title = f"text encoder (6 layers + ITC projection), batch {batch} x {length} tokens"
        self.items = batch

    def build(self) -> None:
        torch.manual_seed(SEED)
        config = make_config(224, self.quick)
        self.model = XVLMModel(config).eval()
        self.ids, self.mask = make_text(self.batch, self.length, config.text_config.vocab_size, self.length // 2)

    def forward(self) -> torch.Tensor:
        return self.model.get_text_features(self.ids, self.mask).pooler_output

    def compare(self, reference, output) -> dict[str, float]:
        return {"itc_cosine_min": cosine_min(reference, output)}


# -- 3. fusion -------------------------------------------------------------------------------------------------------


class FusionCase(Case):
    """The 6 fusion layers on `pairs` (text, image) pairs; with `images_shared`, the pairs use that many distinct
    images (`fuse(..., image_index=...)`: image keys/values computed once per image and layer)."""

    unit = "pairs"

    def __init__(self, pairs: int = 32, length: int = 30, images_shared: int | None = None, quick: bool = False):
        super().__init__(quick)
        self.pairs, self.length, self.images_shared = pairs, length, images_shared
        self.number = "3"
        if images_shared:
            self.key = f"fusion_{pairs}p_{images_shared}img_shared"
            self.title = (
                f"fusion (6 layers), {pairs} pairs @ 224 = {images_shared} images x {pairs // images_shared} texts, "
                "image K/V shared (`image_index`)"
            )
        else:
            self.key = f"fusion_{pairs}p"
            self.title = f"fusion (6 layers), {pairs} pairs @ 224 (50 image tokens), {length} text tokens"
        self.items = pairs

    def build(self) -> None:
        torch.manual_seed(SEED)
        config = make_config(224, self.quick)
        self.model = XVLMModel(config).eval()
        ids, self.mask = make_text(self.pairs, self.length, config.text_config.vocab_size, self.length // 2)
        with torch.no_grad():
            self.text = self.model.get_text_features(ids, self.mask).last_hidden_state
        generator = torch.Generator().manual_seed(SEED + 1)
        n_images = self.images_shared or self.pairs
        self.images = torch.randn(n_images, 1 + config.num_patches, config.vision_width, generator=generator)
        self.index = (
            torch.arange(self.pairs) // (self.pairs // self.images_shared) if self.images_shared else None
        )

    def forward(self) -> torch.Tensor:
        return self.model.fuse(self.text, self.mask, self.images, image_index=self.index)[:, 0]

    def compare(self, reference, output) -> dict[str, float]:
        return {"cls_cosine_min": cosine_min(reference, output)}


# -- 4. retrieval training step ----------------------------------------------------------------------------------------


class TrainRetrievalCase(Case):
    unit = "pairs"
    training = True
    max_repeats = 9  # about 3 s a step on 2 idle cores; more rounds to resolve differences of a few %
    needs = "XVLMForRetrieval"

    def __init__(self, batch: int = 4, image_size: int = 224, length: int = 30, quick: bool = False):
        super().__init__(quick)
        self.batch, self.image_size, self.length = batch, image_size, length
        self.key = f"train_retrieval_{image_size}_b{batch}"
        self.number = "4"
        self.title = f"retrieval training step (ITC + ITM, forward + backward), batch {batch} @ {image_size}"
        self.items = batch

    def build(self) -> None:
        import modeling_xvlm

        torch.manual_seed(SEED)
        config = make_config(self.image_size, self.quick)
        self.model = modeling_xvlm.XVLMForRetrieval(config).train()
        self.pixels = make_pixels(self.batch, config.image_size)
        self.ids, self.mask = make_text(self.batch, self.length, config.text_config.vocab_size, self.length // 2)

    def variants(self) -> list[Variant]:
        base = super().variants()
        return base + [Variant("sdpa", "fp32", checkpointing=True)]

    def forward(self) -> torch.Tensor:
        torch.manual_seed(SEED)  # same dropout masks and hard negatives in every variant
        self.model.zero_grad(set_to_none=True)
        loss = self.model(
            pixel_values=self.pixels, input_ids=self.ids, attention_mask=self.mask, return_loss=True
        ).loss
        return loss

    def callable_for(self, variant: Variant, compiled: Any = None):
        function = compiled if compiled is not None else self.forward

        def call() -> torch.Tensor:
            self.set_attn(variant.attn)
            self.set_checkpointing(variant.checkpointing)
            with variant.autocast():
                loss = function()
            loss.backward()
            return loss.detach().float()

        return call

    def compare(self, reference, output) -> dict[str, float]:
        return {"loss_rel_diff": float(abs(output - reference) / abs(reference))}


# -- 5. grounding inference --------------------------------------------------------------------------------------------


class GroundingCase(Case):
    unit = "images"
    max_repeats = 3
    needs = "XVLMForGrounding"

    def __init__(self, batch: int = 8, image_size: int = 384, length: int = 30, quick: bool = False):
        super().__init__(quick)
        self.batch, self.image_size, self.length = batch, image_size, length
        self.key = f"grounding_{image_size}_b{batch}"
        self.number = "5"
        self.title = f"grounding inference (Swin-B + 12 text/fusion layers + box head), batch {batch} @ {image_size}"
        self.items = batch

    def build(self) -> None:
        import modeling_xvlm

        torch.manual_seed(SEED)
        config = make_config(self.image_size, self.quick)
        self.model = modeling_xvlm.XVLMForGrounding(config).eval()
        self.pixels = make_pixels(self.batch, config.image_size)
        self.ids, self.mask = make_text(self.batch, self.length, config.text_config.vocab_size, self.length // 2)

    def forward(self) -> torch.Tensor:
        return self.model(pixel_values=self.pixels, input_ids=self.ids, attention_mask=self.mask).pred_boxes

    def compare(self, reference, output) -> dict[str, float]:
        return {"box_max_abs_diff": max_abs(reference, output)}


def all_cases(quick: bool = False) -> list[Case]:
    return [
        VisionCase(224, 8, quick=quick),
        VisionCase(384, 4, quick=quick),
        TextCase(32, 30, quick=quick),
        FusionCase(32, 30, quick=quick),
        FusionCase(32, 30, images_shared=8, quick=quick),
        TrainRetrievalCase(4, 224, quick=quick),
        GroundingCase(8, 384, quick=quick),
    ]
