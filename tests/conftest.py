"""Shared fixtures: tiny configs, a tokenizer built from a small vocab, and generated images.

Nothing here touches the network: every test builds what it needs locally.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_WORDS = [
    "a", "an", "the", "of", "on", "in", "to", "and", "is", "with", "at", "picture", "photo",
    "left", "right", "top", "bottom", "above", "below", "next", "small", "large", "big",
    "red", "green", "blue", "yellow", "white", "black", "purple", "orange",
    "circle", "square", "triangle", "shape", "dog", "cat", "man", "woman", "bright",
    "##s", "##ing", "##ed", "##er", "##ly", "run", "jump", "play", "walk",
]


@pytest.fixture(scope="session")
def tiny_vocab() -> dict[str, int]:
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + TINY_WORDS)}


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_vocab) -> BertTokenizer:
    """A WordPiece tokenizer over ``tiny_vocab`` ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4)."""
    return BertTokenizer(vocab=dict(tiny_vocab))


@pytest.fixture
def rgb_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    """A fresh tiny X-VLM config: 64 px input, 8x8 patch grid (P = 64), vision width 32, text 1 + 1 layers."""
    from modeling_xvlm import XVLMConfig

    return XVLMConfig.from_preset("tiny")


@pytest.fixture
def tiny_inputs(tiny_config):
    """Two images and two texts (the second padded) for the tiny config."""
    generator = torch.Generator().manual_seed(1)
    size = tiny_config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=generator)
    input_ids = torch.randint(5, tiny_config.text_config.vocab_size, (2, 7), generator=generator)
    input_ids[:, 0] = 2
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    input_ids[1, 5:] = 0
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and avoids oversubscribing a shared CPU (modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
