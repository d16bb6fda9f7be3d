"""The documentation cannot rot: every ```python block of docs/*.md and README.md runs here.

Convention (also in docs/index.md):

- A fenced block whose info string is exactly ``python`` is executed. The blocks of one file run in order in one
  namespace (a file reads as one script), in a scratch directory that holds
  - tiny random stand-ins for the checkpoints the docs name: ``org/xvlm-base-coco-retrieval`` (`XVLMForRetrieval`),
    ``org/xvlm-base-refcoco-grounding`` (`XVLMForGrounding`), ``org/xvlm-base-16m`` (`XVLMForPretraining`),
    each with an `XVLMProcessor`, so `from_pretrained("org/...")` finds a local folder and never the Hub;
  - generated images ``dog.jpg``, ``cat.jpg`` and ``street.jpg``.
- ``python no-run`` (any info string with a second word ``no-run``) shows code that is not executed (it needs the
  Hub, a GPU, official checkpoints or data sets).
- Other languages (``bash``, ``text``, ...) are never executed.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md"]
FENCE = re.compile(r"^(?P<indent> {0,3})```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)

# Words the stand-in tokenizer knows (anything else becomes [UNK], which is fine for random weights).
VOCAB_WORDS = (
    "a an the of on in to and is with at this photo picture image dog dogs cat cats man woman person people "
    "street car red blue green white black small big left right top bottom sofa grass sitting running"
).split()
STAND_INS = {
    "org/xvlm-base-coco-retrieval": "XVLMForRetrieval",
    "org/xvlm-base-refcoco-grounding": "XVLMForGrounding",
    "org/xvlm-base-16m": "XVLMForPretraining",
}
IMAGES = {"dog.jpg": (96, 128), "cat.jpg": (120, 90), "street.jpg": (80, 160)}


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """`(line, code, runs)` for every ```python block; `runs` is False for ```python no-run."""
    blocks = []
    for match in FENCE.finditer(text):
        words = match.group("info").split()
        if not words or words[0] != "python":
            continue
        runs = "no-run" not in words[1:]
        line = text.count("\n", 0, match.start()) + 2
        body = "\n".join(l[len(match.group("indent")):] for l in match.group("body").splitlines())
        blocks.append((line, body, runs))
    return blocks


def test_block_extraction_convention() -> None:
    text = "x\n```python\na = 1\n```\n```python no-run\nb = 2\n```\n```bash\nls\n```\n```py\nc = 3\n```\n"
    assert python_blocks(text) == [(3, "a = 1", True), (6, "b = 2", False)]


@pytest.fixture(scope="module")
def docs_workdir(tmp_path_factory):
    """A scratch directory with the stand-in checkpoints and images (see the module docstring)."""
    import modeling_xvlm
    from modeling_xvlm import XVLMConfig
    from modeling_xvlm.processing import XVLMProcessor
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("docs")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB_WORDS]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    config = XVLMConfig.from_preset("tiny")
    processor = XVLMProcessor.from_model_config(config, tokenizer=tokenizer)
    torch.manual_seed(0)
    for name, class_name in STAND_INS.items():
        getattr(modeling_xvlm, class_name)(config).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    rng = np.random.default_rng(0)
    for name, (height, width) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB").save(root / name)
    return root


def _doc_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


@pytest.mark.parametrize("doc", DOC_FILES, ids=_doc_id)
def test_doc_snippets_run(doc: Path, docs_workdir, monkeypatch) -> None:
    blocks = [(line, code) for line, code, runs in python_blocks(doc.read_text(encoding="utf-8")) if runs]
    if not blocks:
        pytest.skip(f"{_doc_id(doc)} has no runnable python block")
    monkeypatch.chdir(docs_workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time: patch it too
    monkeypatch.setattr(sys, "argv", [str(doc)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__main__"}
    try:
        for line, code in blocks:
            try:
                exec(compile(code, f"{_doc_id(doc)}:{line}", "exec"), namespace)
            except Exception as error:  # name the block in the failure
                raise AssertionError(
                    f"{_doc_id(doc)}, python block at line {line} failed: {type(error).__name__}: {error}\n"
                    "(mark it ```python no-run if it cannot run offline on the stand-ins; see docs/index.md)"
                ) from error
    finally:
        torch.set_num_threads(threads)


def test_grounding_example_writes_a_png(tmp_path, monkeypatch) -> None:
    output = tmp_path / "preview.png"
    monkeypatch.setattr(sys, "argv", ["grounding_preview.py", "--output", str(output)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(REPO_ROOT / "examples" / "grounding_preview.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    preview = Image.open(output)
    assert preview.format == "PNG" and preview.mode == "RGB"
    pixels = np.asarray(preview)
    assert ((pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)).any()  # the drawn box
    assert os.path.getsize(output) > 0
