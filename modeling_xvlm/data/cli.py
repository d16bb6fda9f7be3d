"""``xvlm-data``: generate the synthetic dataset, convert the official JSON files, inspect a dataset folder.

Examples::

    xvlm-data synthetic --out data/synthetic                  # 4000/200/200 images, seed 0
    xvlm-data synthetic                                       # the default cache folder used by load_xvlm_dataset()
    xvlm-data convert-official --out data/coco --image-root /data/images \\
        --retrieval-train coco_train.json --retrieval-val coco_val.json --retrieval-test coco_test.json
    xvlm-data convert-official --out data/nlvr2 --image-root images/nlvr2 \\
        --nlvr2-train nlvr_train.json --nlvr2-validation nlvr_dev.json --nlvr2-test nlvr_test.json
    xvlm-data convert-official --out data/vqa --image-root images/coco --vg-image-root images/visualgenome \\
        --vqa-train vqa_train.json vqa_val.json vg_qa.json --vqa-test vqa_test.json --vqa-answer-list answer_list.json
    xvlm-data convert-official --out data/coco-captions --image-root images/coco \\
        --captioning-train coco_karpathy_train.json --captioning-val coco_karpathy_val.json \\
        --captioning-test coco_karpathy_test.json --captioning-val-gt coco_karpathy_val_gt.json \\
        --captioning-test-gt coco_karpathy_test_gt.json
    xvlm-data info data/coco
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli_errors import cli_errors
from .schemas import CONFIG_NAMES, IMAGE_COLUMNS

__all__ = ["main", "build_parser"]

#: The configurations whose rows hold images (each gets a ``--<config>-image-root`` flag).
_IMAGE_CONFIGS = tuple(c for c in CONFIG_NAMES if IMAGE_COLUMNS[c])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xvlm-data", description="X-VLM datasets in the Hugging Face Hub format.")
    sub = parser.add_subparsers(dest="command", required=True)

    syn = sub.add_parser(
        "synthetic", help="generate the synthetic shapes dataset (deterministic by seed)",
        description="Generate the synthetic shapes dataset (configurations pretrain, retrieval, grounding, nlvr2, vqa, "
        "vqa_answers), deterministic by seed, into --out or into the cache folder that load_xvlm_dataset() reads.",
    )
    syn.add_argument("--out", type=Path, default=None,
                     help="output folder (default: the cache folder that load_xvlm_dataset() uses)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--num-train", type=int, default=None, help="training images (default 4000)")
    syn.add_argument("--num-validation", "--num-val", dest="num_validation", type=int, default=None,
                     help="validation images (default 200)")
    syn.add_argument("--num-test", type=int, default=None, help="test images (default 200)")
    syn.add_argument("--max-objects", type=int, default=None, help="at most this many shapes per image (1-4)")
    syn.add_argument("--test-heldout-fraction", type=float, default=None,
                     help="fraction of test images with a held-out colour-shape combination (default 0.25)")
    syn.add_argument("--expressions-per-object", type=int, default=None,
                     help="referring expressions per object in train (default 1)")
    syn.add_argument("--num-nlvr2-train", type=int, default=None,
                     help="NLVR2 image pairs in train (default 3/4 of the train images)")
    syn.add_argument("--num-nlvr2-validation", "--num-nlvr2-val", dest="num_nlvr2_validation", type=int,
                     default=None, help="NLVR2 image pairs in validation (default 3/4 of its images)")
    syn.add_argument("--num-nlvr2-test", type=int, default=None,
                     help="NLVR2 image pairs in test (default 3/4 of its images)")
    syn.add_argument("--num-vqa-train", type=int, default=None,
                     help="VQA questions in train (default 3 per train image)")
    syn.add_argument("--num-vqa-validation", "--num-vqa-val", dest="num_vqa_validation", type=int, default=None,
                     help="VQA questions in validation (default 3 per image)")
    syn.add_argument("--num-vqa-test", type=int, default=None, help="VQA questions in test (default 3 per image)")
    syn.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    syn.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="a progress bar of the scenes of each split")

    conv = sub.add_parser(
        "convert-official", help="convert official X-VLM JSON files + an image root",
        description="Convert the official X-VLM annotation files (pre-training, retrieval, RefCOCO+ and dets.json, "
        "NLVR2, VQA JSON) and the image root they refer to into a Hub-format dataset folder (Parquet shards, one "
        "configuration per task, a dataset card) that load_xvlm_dataset() and xvlm-train read.",
    )
    conv.add_argument("--out", type=Path, required=True, help="output dataset folder")
    conv.add_argument("--image-root", type=Path, required=True, help="folder that image paths are relative to")
    conv.add_argument("--pretrain-text", nargs="+", default=[], metavar="PATH",
                      help="image-text JSON-lines files or folders (official format: caption + binary|image_rpath)")
    conv.add_argument("--pretrain-regions", nargs="+", default=[], metavar="PATH",
                      help="region JSON-lines files or folders (official format: elems [+ caption] + binary|image_rpath)")
    for split in ("train", "val", "test"):
        conv.add_argument(f"--retrieval-{split}", type=Path, default=None, metavar="JSON",
                          help=f"retrieval file, e.g. coco_{split}.json")
    for split in ("train", "val", "test"):
        conv.add_argument(f"--grounding-{split}", type=Path, default=None, metavar="JSON",
                          help=f"RefCOCO+ file, e.g. refcoco+_{split}.json")
    for split, example in (("train", "train"), ("validation", "dev"), ("test", "test")):
        conv.add_argument(f"--nlvr2-{split}", type=Path, default=None, metavar="JSON",
                          help=f"NLVR2 file, e.g. nlvr_{example}.json")
    for split, example in (("train", "vqa_train.json vqa_val.json vg_qa.json"), ("validation", "vqa_val.json"),
                           ("test", "vqa_test.json")):
        flags = [f"--vqa-{split}"] + (["--vqa-val"] if split == "validation" else [])
        conv.add_argument(*flags, dest=f"vqa_{split}", nargs="+", type=Path, default=[], metavar="JSON",
                          help=f"VQA file(s), concatenated in order, e.g. {example}")
    for split, example in (("train", "train"), ("validation", "val"), ("test", "test")):
        flags = [f"--captioning-{split}"] + (["--captioning-val"] if split == "validation" else [])
        conv.add_argument(*flags, dest=f"captioning_{split}", type=Path, default=None, metavar="JSON",
                          help=f"COCO Karpathy captioning file, e.g. coco_karpathy_{example}.json (retrieval rows)")
        if split != "train":
            flags = [f"--captioning-{split}-gt"] + (["--captioning-val-gt"] if split == "validation" else [])
            conv.add_argument(*flags, dest=f"captioning_{split}_gt", type=Path, default=None, metavar="JSON",
                              help=f"its ground truth (COCO caption format), e.g. coco_karpathy_{example}_gt.json")
    conv.add_argument("--vqa-answer-list", type=Path, default=None, metavar="JSON",
                      help="the candidate answers of the ranking evaluation (answer_list.json)")
    conv.add_argument("--vg-image-root", type=Path, default=None,
                      help='image root of VQA records with "dataset": "vg" (default: the vqa image root)')
    conv.add_argument("--refcoco-refs", type=Path, default=None, help="refs(unc).p (boxes of grounding records)")
    conv.add_argument("--refcoco-instances", type=Path, default=None, help="instances.json of RefCOCO+")
    conv.add_argument("--refcoco-dets", type=Path, default=None,
                      help="dets.json of RefCOCO+ (detections per image: the grounding rows' candidate_boxes, "
                      "ranked by xvlm-eval grounding --method gradcam)")
    for config in _IMAGE_CONFIGS:
        conv.add_argument(f"--{config}-image-root", type=Path, default=None,
                          help=f"image root for the {config} inputs (default --image-root)")
    conv.add_argument("--image-key", default=None, help="image field of pre-training lines (default: auto)")
    conv.add_argument("--caption-key", default="caption", help="caption field of pre-training lines")
    conv.add_argument("--no-verify-images", action="store_true", help="do not fully decode each image")
    conv.add_argument("--max-records", type=int, default=None, help="read at most N records per input")
    conv.add_argument("--shard-size-mb", type=int, default=500, help="approximate Parquet shard size")
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument("--allow-outside-image-root", action="store_true",
                      help="read image paths that leave their image root (absolute or ../); they are stored by file "
                      "name only. Default: such records are skipped and counted (outside_image_root)")
    conv.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="progress bars (rows written per configuration and split)")

    info = sub.add_parser(
        "info", help="print the configurations, splits, row counts and features of a dataset",
        description="Print the configurations, splits, row counts and features of a dataset folder or Hub id.",
    )
    info.add_argument("path", nargs="?", default=None, help="dataset folder or Hub id (default: synthetic)")
    return parser


def _synthetic(args: argparse.Namespace) -> int:
    import dataclasses

    from .loading import ensure_synthetic_dataset
    from .synthetic import SyntheticConfig, write_synthetic_dataset

    overrides = {
        "seed": args.seed, "num_train": args.num_train, "num_validation": args.num_validation,
        "num_test": args.num_test, "max_objects": args.max_objects,
        "test_heldout_fraction": args.test_heldout_fraction,
        "expressions_per_object_train": args.expressions_per_object,
        "num_nlvr2_train": args.num_nlvr2_train, "num_nlvr2_validation": args.num_nlvr2_validation,
        "num_nlvr2_test": args.num_nlvr2_test,
        "num_vqa_train": args.num_vqa_train, "num_vqa_validation": args.num_vqa_validation,
        "num_vqa_test": args.num_vqa_test,
    }
    config = dataclasses.replace(SyntheticConfig(), **{k: v for k, v in overrides.items() if v is not None})
    if args.out is None:
        path = ensure_synthetic_dataset(config, progress=args.progress)
        print(json.dumps({"out": str(path), "cache_key": config.cache_key()}, indent=2))
        return 0
    summary = write_synthetic_dataset(args.out, config, overwrite=args.overwrite, progress=args.progress)
    print(json.dumps({"out": str(args.out), "counts": summary["counts"], "seconds": summary["seconds"]}, indent=2))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .official import convert_official

    summary = convert_official(
        args.out,
        args.image_root,
        pretrain_text=args.pretrain_text,
        pretrain_regions=args.pretrain_regions,
        retrieval={"train": args.retrieval_train, "val": args.retrieval_val, "test": args.retrieval_test},
        grounding={"train": args.grounding_train, "val": args.grounding_val, "test": args.grounding_test},
        nlvr2={"train": args.nlvr2_train, "validation": args.nlvr2_validation, "test": args.nlvr2_test},
        vqa={"train": args.vqa_train, "validation": args.vqa_validation, "test": args.vqa_test},
        vqa_answer_list=args.vqa_answer_list,
        captioning={"train": args.captioning_train, "validation": args.captioning_validation,
                    "test": args.captioning_test},
        captioning_gt={"validation": args.captioning_validation_gt, "test": args.captioning_test_gt},
        vg_image_root=args.vg_image_root,
        refcoco_refs=args.refcoco_refs,
        refcoco_instances=args.refcoco_instances,
        refcoco_dets=args.refcoco_dets,
        image_roots={c: getattr(args, f"{c}_image_root") for c in _IMAGE_CONFIGS},
        image_key=args.image_key,
        caption_key=args.caption_key,
        verify_images=not args.no_verify_images,
        max_records=args.max_records,
        overwrite=args.overwrite,
        max_shard_bytes=args.shard_size_mb * 1024 * 1024,
        allow_outside_root=args.allow_outside_image_root,
        progress=args.progress,
    )
    print(summary.format())
    print(f"Summary written to {Path(args.out) / 'conversion_summary.json'}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import datasets

    from .loading import ensure_synthetic_dataset
    from .schemas import feature_mismatches

    path = args.path or str(ensure_synthetic_dataset())
    print(f"dataset: {path}")
    for config in datasets.get_dataset_config_names(path):
        parts = datasets.load_dataset(path, config)
        for split, part in parts.items():
            problems = feature_mismatches(part.features, config) if config in CONFIG_NAMES else ["not an X-VLM config"]
            status = "ok" if not problems else "; ".join(problems)
            print(f"  {config}/{split}: {part.num_rows} rows, schema {status}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xvlm-data``; returns the exit status (bad input: one line on stderr and 2, see
    `modeling_xvlm.cli_errors`)."""
    args = build_parser().parse_args(argv)
    run = {"synthetic": _synthetic, "convert-official": _convert}.get(args.command, _info)
    return cli_errors(f"xvlm-data {args.command}")(run)(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
