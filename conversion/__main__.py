"""Command line: convert an official X-VLM checkpoint into a Hugging Face folder.

    python -m modeling_xvlm.conversion --checkpoint model_state_step_199999.th --task pretrain --output xvlm-4m
    xvlm-convert --checkpoint checkpoint_best.pth --task retrieval --image-size 384 --output xvlm-coco \
        --tokenizer bert-base-uncased/ [--config configs/Retrieval_coco.yaml] [--push-to-hub user/xvlm-coco]
    xvlm-convert --checkpoint vqa_model_state_epoch_9.th --output xvlm-vqa --tokenizer bert-base-uncased/
    xvlm-convert --checkpoint coco_capt_ft_epoch_4.th --output xvlm-caption --tokenizer bert-base-uncased/ \
        [--config configs/Captioning.yaml]

See docs/conversion.md for what is inferred, the key mapping and the parity contract.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from modeling_xvlm.cli_errors import cli_errors

from .convert_official import DEFAULT_TOKENIZER, HEAD_CLASS_NAMES, TASKS, convert_checkpoint
from .official_checkpoints import OFFICIAL_CHECKPOINTS
from .safe_load import UnsafeCheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvlm-convert",
        description="Convert an official X-VLM checkpoint (.th/.pth, zengyan-97/X-VLM) into a complete Hugging Face "
        "folder: config.json, model.safetensors, the processor and tokenizer files, and a model card (README.md) with "
        "the task, the official result and the conversion command. The task is detected from the keys unless "
        "--task is given. The released checkpoints, one by one: docs/weights.md.",
    )
    parser.add_argument("--checkpoint", required=True, help="official checkpoint file (.th / .pth / .safetensors)")
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=None,
        help="target model (the task table modeling_xvlm.tasks.TASKS): "
        + ", ".join(f"{task} ({HEAD_CLASS_NAMES[task]})" for task in TASKS)
        + "; default: detected from the keys",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size of the converted model (224, 384 or 480 for X-VLM-base); default: the checkpoint's. A "
        "224/window-7 pre-training checkpoint converted at 384 gets window 12 and resized position tables",
    )
    parser.add_argument("--window-size", type=int, default=None, help="Swin window of the converted model (advanced)")
    parser.add_argument(
        "--config",
        default=None,
        help="official task YAML (e.g. configs/Retrieval_coco.yaml); its vision_config/text_config JSON paths are "
        "resolved relative to the YAML file or the working directory",
    )
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help="the BERT tokenizer written with the processor: a local folder (vocab.txt or tokenizer.json) or a Hub "
        f"id (default {DEFAULT_TOKENIZER}: a folder of that name if there is one, else the Hub). Writes an "
        "XVLMProcessor (vqa: official question cleaning) and sets text_config.bos_token_id / eos_token_id to its "
        "[CLS] / [SEP] ids (needed by vqa / captioning generate)",
    )
    parser.add_argument(
        "--no-tokenizer", action="store_true", help="write no processor or tokenizer (the model files only)"
    )
    parser.add_argument(
        "--official",
        default=None,
        choices=tuple(OFFICIAL_CHECKPOINTS),
        metavar="NAME",
        help="which released checkpoint this is (see docs/weights.md: "
        + ", ".join(OFFICIAL_CHECKPOINTS)
        + "): the model card records its official result; checked against the task of the keys",
    )
    parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="upload the written folder to this Hub repo (HfApi.create_repo + upload_folder; needs `hf auth login`); "
        "fails at once when HF_HUB_OFFLINE=1",
    )
    parser.add_argument("--base-model", default=None, help="Hub id recorded as base_model in the model card")
    parser.add_argument("--no-verify", action="store_true", help="skip re-reading the folder with from_pretrained")
    return parser


@cli_errors("xvlm-convert", extra=(UnsafeCheckpointError, NotImplementedError))
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``xvlm-convert``: bad input (missing, corrupt, unsafe or non-dict checkpoints, unsupported
    architectures) is one line on stderr and exit status 2 (`modeling_xvlm.cli_errors`)."""
    args = build_parser().parse_args(argv)
    convert_checkpoint(
        args.checkpoint,
        args.output,
        task=args.task,
        image_size=args.image_size,
        window_size=args.window_size,
        config=args.config,
        tokenizer=None if args.no_tokenizer else args.tokenizer,
        push_to_hub=args.push_to_hub,
        base_model=args.base_model,
        verify=not args.no_verify,
        official=args.official,
        command=" ".join(["xvlm-convert", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
