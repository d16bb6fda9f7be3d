"""Ground a referring expression and save a PNG with the predicted box drawn on the image.

    python examples/grounding_preview.py --model org/xvlm-base-refcoco-grounding \
        --image street.jpg --text "the man on the left" --output preview.png

Without `--model` it builds a tiny random X-VLM (and, without `--image`, a generated image), so the script runs
offline in seconds; the box is then meaningless but the whole path (processor -> XVLMForGrounding -> pixel box ->
drawing) is exercised.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image
from transformers import BertTokenizer, pipeline

import modeling_xvlm  # noqa: F401  (registers the "visual-grounding" pipeline)
from modeling_xvlm import XVLMConfig, XVLMForGrounding
from modeling_xvlm.processing import XVLMProcessor


def tiny_grounder():
    """A random tiny grounding model with its processor (for trying the script without a checkpoint)."""
    words = "the a man woman dog cat car on left right in of red blue".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    config = XVLMConfig.from_preset("tiny")
    processor = XVLMProcessor.from_model_config(config, tokenizer=tokenizer)
    return pipeline("visual-grounding", model=XVLMForGrounding(config).eval(), processor=processor)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an XVLMForGrounding checkpoint (folder or Hub id); default: tiny random")
    parser.add_argument("--image", help="image path or URL; default: a generated 320x240 image")
    parser.add_argument("--text", default="the man on the left", help="the referring expression")
    parser.add_argument("--output", default="grounding_preview.png", help="PNG file to write")
    args = parser.parse_args(argv)

    grounder = pipeline("visual-grounding", model=args.model) if args.model else tiny_grounder()
    if args.image:
        image = args.image
    else:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8), mode="RGB")
    result = grounder(image, args.text)
    result["preview"].save(args.output, format="PNG")
    box = result["box"]
    print(f"{args.text!r}: box (x0, y0, x1, y1) = ({box['xmin']}, {box['ymin']}, {box['xmax']}, {box['ymax']}) px")
    print(f"preview written to {args.output}")
    return result


if __name__ == "__main__":
    main()
