"""The CPU demonstration job: ``xvlm-train`` without arguments.

1. Load the synthetic dataset (generated into the cache on first use) and decode its images once.
2. Pre-train a small X-VLM from scratch with the official objectives: image-text batches (ITC + ITM + MLM) and
   region batches (ITC + ITM + MLM on regions + box L1 + GIoU), ``--no-regions`` drops the region/box part.
3. Fine-tune the pre-trained weights for retrieval (ITC + ITM) and for grounding (box L1 + GIoU).
4. Evaluate on the test split: retrieval R@1/5/10 both ways (ITC top-k, ITM re-rank) and grounding Acc@0.5 with the
   official inclusive-pixel IoU, next to chance level. Writes ``<output-dir>/results.json``.

The defaults are tuned to finish in under 10 minutes on 2 CPU cores; see docs/training.md for measured results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..box_ops import inclusive_pixel_iou
from ..data import load_xvlm_dataset
from ..modeling_xvlm_grounding import XVLMForGrounding
from ..modeling_xvlm_retrieval import XVLMForRetrieval
from ..processing import XVLMProcessor
from .evaluate import evaluate_grounding, evaluate_retrieval, format_table
from .train import TrainConfig, train

__all__ = ["DEMO_SIZES", "main", "run_demo"]

#: Model sizes of the demo job (``--size``), as overrides of the ``tiny`` preset (64 px input, 8 x 8 patch grid).
#: Dropout is off. ``tiny`` adds learned absolute position embeddings to Swin: with only 2 small stages the patch
#: tokens carry almost no absolute position otherwise, and the box head (and "left of" captions) need it.
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision_config": {"use_absolute_embeddings": True},
        "text_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    },
    "tiny-noape": {
        "text_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    },
    "small": {
        "vision_config": {"embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4,
                          "use_absolute_embeddings": True},
        "text_config": {
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "fusion_layer": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "projection_dim": 64,
    },
}


def _decode(dataset: Any) -> list[dict[str, Any]]:
    """Rows with their images decoded once (the demo keeps the small synthetic images in memory)."""
    rows = []
    for row in dataset:
        row = dict(row)
        row["image"] = row["image"].convert("RGB")
        rows.append(row)
    return rows


def _random_object_chance(grounding_rows: Sequence[dict], pretrain_rows: Sequence[dict]) -> float:
    """Acc@0.5 (%) of answering with a uniformly random object of the image (its exact box)."""
    objects = {row["image_id"]: [o["bbox"] for o in row["objects"]] for row in pretrain_rows}
    total = 0.0
    for row in grounding_rows:
        boxes = objects.get(row["image_id"]) or [row["bbox"]]
        gt = torch.tensor([row["bbox"]] * len(boxes), dtype=torch.float64)
        hits = inclusive_pixel_iou(gt, torch.tensor(boxes, dtype=torch.float64)) >= 0.5
        total += float(hits.double().mean())
    return 100.0 * total / max(len(grounding_rows), 1)


def _say(message: str) -> None:
    print(message, flush=True)


def _demo_data(args: argparse.Namespace) -> tuple[dict[tuple[str, str], Any], list[dict]]:
    """The decoded splits `{(config, split): rows}` the demo trains and evaluates on, and the test scenes."""
    started = time.perf_counter()
    data: dict[tuple[str, str], Any] = {}
    for config_name in ("pretrain", "retrieval", "grounding"):
        for split in ("train", "validation", "test"):
            if config_name == "pretrain" and split != "train":
                continue
            data[(config_name, split)] = _decode(load_xvlm_dataset(args.dataset, config_name, split))
    test_pretrain = _decode(load_xvlm_dataset(args.dataset, "pretrain", "test"))
    _say(f"[demo] data ready in {time.perf_counter() - started:.1f}s: "
         f"{len(data[('pretrain', 'train')])} pre-training images, {len(data[('retrieval', 'test')])} test images, "
         f"{len(data[('grounding', 'test')])} test expressions")
    return data, test_pretrain


def _train_stages(args: argparse.Namespace, data: dict, timings: dict[str, float]) -> dict[str, Any]:
    """Pre-training, then retrieval and grounding fine-tuning from it; returns the pre-training summary."""
    out = args.output_dir
    common = dict(
        model="tiny",
        config_overrides=json.loads(json.dumps(DEMO_SIZES[args.size])),
        randaugment=False,
        crop_scale_min=1.0,
        seed=args.seed,
        eval_at_end=False,
        log_every=25,
        progress=not args.no_progress,
        cpu=True,
        mixed_precision="no",
        k_test=args.k_test,
    )
    t0 = time.perf_counter()
    pre = train(
        TrainConfig(
            task="pretrain", output_dir=os.path.join(out, "pretrain"), max_steps=args.pretrain_steps,
            batch_size=args.batch_size, lr=args.pretrain_lr, warmup=0.05, regions=not args.no_regions,
            iter_perc=args.iter_perc, region_max_images=args.region_images, region_batch_texts=args.region_texts,
            image_size=args.image_size, tokenizer=args.tokenizer, **common,
        ),
        data=data,
    )
    timings["pretrain"] = time.perf_counter() - t0
    finetune = {**common, "model": pre["output_dir"], "config_overrides": {}}
    stages = (
        ("retrieval", args.retrieval_steps, args.finetune_lr, {}),
        ("grounding", args.grounding_steps, args.grounding_lr, {"grounding_crop": args.grounding_crop}),
    )
    for task, steps, lr, extra in stages:
        t0 = time.perf_counter()
        train(TrainConfig(task=task, output_dir=os.path.join(out, task), max_steps=steps, batch_size=args.batch_size,
                          lr=lr, warmup=0.1, **extra, **finetune), data=data)
        timings[task] = time.perf_counter() - t0
    return pre


def _evaluate_stages(args: argparse.Namespace, data: dict, test_pretrain: list[dict]) -> tuple[dict, dict]:
    """Test-split retrieval recalls and grounding accuracy (with the random-object chance level)."""
    out = args.output_dir
    processor = XVLMProcessor.from_pretrained(os.path.join(out, "retrieval"))
    retrieval_model = XVLMForRetrieval.from_pretrained(os.path.join(out, "retrieval"))
    retrieval = evaluate_retrieval(retrieval_model, processor, data[("retrieval", "test")], k_test=args.k_test)
    grounding_model = XVLMForGrounding.from_pretrained(os.path.join(out, "grounding"))
    grounding = evaluate_grounding(grounding_model, processor, data[("grounding", "test")])
    grounding["chance"] = _random_object_chance(data[("grounding", "test")], test_pretrain)
    return retrieval, grounding


def _report(args: argparse.Namespace, retrieval: dict, grounding: dict, timings: dict[str, float]) -> None:
    rows = [
        ["retrieval text R@1 (image->text)", retrieval["txt_r1"], retrieval["chance"]["txt_r1"]],
        ["retrieval image R@1 (text->image)", retrieval["img_r1"], retrieval["chance"]["img_r1"]],
        ["grounding Acc@0.5", grounding["acc@0.5"], grounding["chance"]],
    ]
    _say("")
    _say(f"X-VLM demo ({'no region/box objectives' if args.no_regions else 'full multi-grained pre-training'}), "
         f"test split: {retrieval['num_images']} images / {retrieval['num_texts']} captions, "
         f"{grounding['num_examples']} expressions")
    _say(format_table(rows, ["metric", "model (%)", "chance (%)"]))
    _say(f"retrieval R@5/R@10: text {retrieval['txt_r5']:.1f}/{retrieval['txt_r10']:.1f}, image "
         f"{retrieval['img_r5']:.1f}/{retrieval['img_r10']:.1f}; r_mean {retrieval['r_mean']:.1f}")
    groups = grounding.get("groups") or {}
    if groups:
        _say("grounding by group: " + ", ".join(f"{g} {m['acc@0.5']:.1f} (n={m['num_examples']})"
                                                for g, m in groups.items()))
    _say(f"grounding prior baseline (always the mean box): {grounding['prior_baseline']:.1f}")
    _say("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The demo job: data, pre-training + fine-tuning, test-split evaluation, report (`results.json`)."""
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    data, test_pretrain = _demo_data(args)
    timings: dict[str, float] = {}
    pre = _train_stages(args, data, timings)
    t0 = time.perf_counter()
    retrieval, grounding = _evaluate_stages(args, data, test_pretrain)
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    timings["process_cpu"] = time.process_time() - cpu_started
    _report(args, retrieval, grounding, timings)
    results = {
        "retrieval": retrieval,
        "grounding": grounding,
        "timings_s": timings,
        "pretrain_last_losses": pre["last_losses"],
        "args": vars(args),
    }
    out = args.output_dir
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, default=str)
    _say(f"models in {out}/{{pretrain,retrieval,grounding}}, metrics in {out}/results.json")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvlm-train [demo]",
        description="Pre-train a small X-VLM on the synthetic dataset, fine-tune it for retrieval and grounding, "
        "and evaluate on the test split (CPU, about 10 minutes on 2 cores).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", default="xvlm-demo", help="folder for the three models and results.json")
    parser.add_argument("--dataset", default=None, help="X-VLM dataset folder or Hub id (default: synthetic)")
    parser.add_argument("--tokenizer", default="synthetic", help="tokenizer path / Hub id ('synthetic': the "
                        "synthetic dataset's word-level vocabulary)")
    parser.add_argument("--size", choices=sorted(DEMO_SIZES), default="tiny", help="model size (DEMO_SIZES)")
    parser.add_argument("--image-size", type=int, default=64, help="model input size (a multiple of 32)")
    parser.add_argument("--no-regions", action="store_true", help="ablation: pre-train without region/box objectives")
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="pre-training iterations")
    parser.add_argument("--retrieval-steps", type=int, default=600, help="retrieval fine-tuning steps")
    parser.add_argument("--grounding-steps", type=int, default=3000, help="grounding fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=64, help="image-text pairs (or expressions) per step")
    parser.add_argument("--region-images", type=int, default=16, help="images per region batch")
    parser.add_argument("--region-texts", type=int, default=64, help="texts per region batch")
    parser.add_argument("--iter-perc", type=float, default=0.5, help="probability of a region step per iteration")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3, help="pre-training learning rate")
    parser.add_argument("--finetune-lr", type=float, default=5e-4, help="retrieval fine-tuning learning rate")
    parser.add_argument("--grounding-lr", type=float, default=1e-3, help="grounding fine-tuning learning rate")
    parser.add_argument("--grounding-crop", action="store_true",
                        help="official box-aware random crop in grounding fine-tuning (off: at 64 px it magnifies the "
                        "objects, and the test images are not cropped)")
    parser.add_argument("--k-test", type=int, default=16, help="retrieval evaluation: ITC candidates re-ranked by ITM")
    parser.add_argument("--seed", type=int, default=42, help="seed of every stage (weights, batches, masking)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_demo(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
