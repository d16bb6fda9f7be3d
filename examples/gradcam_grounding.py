"""Weakly supervised grounding (official `Grounding.py`): rank candidate boxes with a retrieval model's Grad-CAM map
and save a PNG with the map drawn over the image and the chosen box.

    python examples/gradcam_grounding.py --model org/xvlm-base-refcoco-weak \
        --image street.jpg --text "the man on the left" \
        --box 10,40,60,120 --box 150,30,70,140 --output gradcam.png

Candidate boxes are pixel `x,y,w,h` of the original image (the official `dets.json` holds a detector's). Without
`--model` it builds a tiny random X-VLM retrieval model (and, without `--image` and `--box`, a generated image and
four boxes), so the script runs offline in seconds; the choice is then meaningless but the whole path (processor
-> `XVLMForRetrieval.compute_gradcam` -> `post_process_gradcam` -> heat map and box) is exercised.
"""

from __future__ import annotations

import argparse

import numpy as np
from modeling_xvlm.processing import XVLMProcessor
from PIL import Image
from transformers import BertTokenizer, pipeline
from transformers.image_utils import load_image

import modeling_xvlm  # noqa: F401  (registers the "visual-grounding" pipeline)
from modeling_xvlm import XVLMConfig, XVLMForRetrieval


def tiny_weak_grounder():
    """A random tiny retrieval model in the grounding pipeline (for trying the script without a checkpoint)."""
    words = "the a man woman dog cat car on left right in of red blue".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    config = XVLMConfig.from_preset("tiny")
    processor = XVLMProcessor.from_model_config(config, tokenizer=tokenizer)
    return pipeline("visual-grounding", model=XVLMForRetrieval(config).eval(), processor=processor)


def parse_box(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x,y,w,h (four numbers), got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an XVLMForRetrieval checkpoint (folder or Hub id); default: tiny random")
    parser.add_argument("--image", help="image path or URL; default: a generated 320x240 image")
    parser.add_argument("--text", default="the man on the left", help="the referring expression")
    parser.add_argument("--box", dest="boxes", type=parse_box, action="append",
                        help="a candidate box x,y,w,h in pixels (repeat); default: the four quadrants")
    parser.add_argument("--layer", type=int, default=None, help="the fusion layer (default: the config's)")
    parser.add_argument("--output", default="gradcam_grounding.png", help="PNG file to write")
    args = parser.parse_args(argv)

    if args.model:
        grounder = pipeline("visual-grounding", model=XVLMForRetrieval.from_pretrained(args.model).eval(),
                            processor=XVLMProcessor.from_pretrained(args.model))
    else:
        grounder = tiny_weak_grounder()
    if args.image:
        image = load_image(args.image)
    else:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8), mode="RGB")
    boxes = args.boxes
    if not boxes:
        width, height = image.size
        boxes = [[x, y, width / 2, height / 2] for y in (0, height / 2) for x in (0, width / 2)]
    result = grounder(image, args.text, method="gradcam", candidate_boxes=boxes, gradcam_layer=args.layer)
    result["preview"].save(args.output, format="PNG")
    for k, score in enumerate(result["scores"]):
        print(f"box {k} {boxes[k]}: score {score:.6g}" + ("  <- chosen" if k == result["index"] else ""))
    print(f"preview (Grad-CAM map and chosen box) written to {args.output}")
    return result


if __name__ == "__main__":
    main()
