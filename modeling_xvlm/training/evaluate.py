"""Evaluation with the official X-VLM protocols, and the ``xvlm-eval`` command.

* Retrieval (official ``Retrieval.py::evaluation`` + ``itm_eval``, official `Retrieval.py`): every image and text is
  encoded once; the ITC cosine similarity picks the top ``k_test`` candidates in both directions; candidates are
  re-ranked by the raw ITM "match" logit; R@1/5/10 for text retrieval (``txt_r*``, an image's rank is the best rank
  of its ground-truth captions) and image retrieval (``img_r*``), their means and ``r_mean``.
* Grounding (official ``Grounding_bbox.py``): the predicted ``(cx, cy, w, h)`` is mapped back to pixels of the
  original image and compared with the ground truth by the official inclusive-pixel IoU (``computeIoU``); a
  prediction is correct when IoU >= 0.5. Accuracy is reported overall and per ``group`` (RefCOCO+ ``val`` /
  ``testA`` / ``testB``, synthetic ``seen`` / ``heldout``).
* NLVR2 (official ``NLVR.py::evaluate``): evaluation transform (square bicubic resize) for both images, the
  predicted class is the argmax of the 2-way logits, accuracy = mean of ``prediction == label`` over the split
  (percent; the official per-batch accuracies are averaged weighted by batch size, which is the same number).

Usage::

    xvlm-eval retrieval --model out/retrieval --split test --k-test 128 --output retrieval.json
    xvlm-eval grounding --model out/grounding --dataset my-refcoco-folder --split test
    xvlm-eval nlvr2 --model out/nlvr2 --dataset my-nlvr2-folder --split test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoTokenizer

from ..box_ops import inclusive_pixel_iou
from ..data import load_xvlm_dataset, synthetic_tokenizer
from ..modeling_xvlm_grounding import XVLMForGrounding
from ..modeling_xvlm_nlvr import XVLMForImagesAndTextClassification
from ..modeling_xvlm_retrieval import XVLMForRetrieval
from ..processing import XVLMImageProcessorPil, XVLMProcessor, load_image_rgb
from ..retrieval import retrieval_metrics, retrieve, score_matrices
from .collators import XVLMNLVR2Collator
from .region_collators import XVLMGroundingCollator

__all__ = [
    "evaluate_retrieval",
    "evaluate_grounding",
    "evaluate_nlvr2",
    "grounding_accuracy",
    "retrieval_chance",
    "format_table",
    "main",
]


# ----------------------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------------------


def retrieval_chance(img2txt: Sequence[Sequence[int]], n_texts: int) -> dict[str, float]:
    """R@1 of a random ranking: text retrieval ``mean(#gt / n_texts)``, image retrieval ``1 / n_images`` (%)."""
    n_images = len(img2txt)
    return {
        "txt_r1": 100.0 * sum(min(len(g), n_texts) for g in img2txt) / (n_images * max(n_texts, 1)),
        "img_r1": 100.0 / max(n_images, 1),
    }


def _captions(dataset: Any, n: int) -> list[Any]:
    """The captions of the first `n` rows (``captions``, or ``caption``), without decoding a datasets' images."""
    names = getattr(dataset, "column_names", None)
    if names is not None:  # a `datasets.Dataset`: read the text column only
        column = "captions" if "captions" in names else "caption"
        return list(dataset.select_columns([column])[:n][column])
    rows = (dataset[i] for i in range(n))
    return [row["captions"] if "captions" in row else row["caption"] for row in rows]


@torch.no_grad()
def evaluate_retrieval(
    model: Any,
    processor: Any,
    dataset: Any,
    k_test: int = 128,
    batch_size: int = 64,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    encode_precision: str | None = None,
    top1_margin: float = 0.1,
) -> dict[str, Any]:
    """Official retrieval evaluation of ``model`` on a ``retrieval``-schema dataset (rows ``image`` + ``captions``):
    :func:`modeling_xvlm.retrieval.retrieve` (as ``XVLMForRetrieval.rank``) with the images loaded per batch.

    Args:
        model: ``XVLMForRetrieval`` (or any model with ``xvlm`` and ``itm_head``, e.g. ``XVLMForPretraining``).
        processor: ``XVLMProcessor`` (evaluation transform: square bicubic resize; texts cleaned, no [SEP]).
        dataset: rows with ``image`` and ``captions`` (a list of captions per image).
        k_test: ITC candidates re-ranked by ITM in each direction (official 256 COCO, 128 Flickr).
        batch_size: images / texts / fused pairs per forward.
        max_images: evaluate on the first ``max_images`` images only.
        device: the model's device (inputs go there; default: where the model is).
        precision: of the ITM re-ranking, ``"fp32"`` (official numbers) or ``"bf16"`` (autocast; near ties are
            then re-scored in fp32 by :func:`modeling_xvlm.retrieval.refine_top1`, so every query keeps the fp32
            top-1 among its candidates; R@5/R@10 may move).
        encode_precision: of the image and text encoders (default: ``precision``). With ``"fp32"`` the ITC
            candidates, and with a bf16 re-ranking the top-1, are exactly fp32's (``XVLMForRetrieval.rank``).
        top1_margin: the initial margin of that refinement (ITM logits; 0 turns it off).

    Returns:
        ``itm_eval`` metrics (``txt_r1 ... r_mean``, percent) plus ``itc_*`` (the same metrics of the ITC ranking
        alone), ``chance`` (R@1 of a random ranking), ``num_images``, ``num_texts``, ``k_test``, ``precision``,
        ``pairs_refined_fp32`` (pairs re-scored in fp32; 0 in fp32) and ``seconds``.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    model_device = next(model.parameters()).device
    wanted = torch.device(device) if device is not None else model_device
    if wanted.type != model_device.type or wanted.index not in (None, model_device.index):
        raise ValueError(f"device {wanted} is not the model's device {model_device}.")
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    for index, captions in enumerate(_captions(dataset, n)):
        if isinstance(captions, str):
            captions = [captions]
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        texts.extend(captions)
        txt2img.extend([index] * len(captions))

    def load_images(indices: torch.Tensor) -> torch.Tensor:
        rows = [load_image_rgb(dataset[int(i)]["image"]) for i in indices.tolist()]
        return processor.image_processor(rows, return_tensors="pt")["pixel_values"]

    encoded = processor(text=texts, padding="longest")
    try:
        ranking = retrieve(
            model, load_images, encoded["input_ids"], encoded["attention_mask"], k=k_test, batch_size=batch_size,
            precision=precision, encode_precision=encode_precision,
            top1_margin=top1_margin if precision == "bf16" else None, num_images=n,
        )
    finally:
        model.train(was_training)
    scores_i2t, scores_t2i = score_matrices(ranking)
    metrics: dict[str, Any] = retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    itc = retrieval_metrics(ranking.similarity, ranking.similarity.t(), txt2img, img2txt)
    metrics.update({f"itc_{k}": v for k, v in itc.items()})
    metrics["chance"] = retrieval_chance(img2txt, len(texts))
    metrics.update(num_images=n, num_texts=len(texts), k_test=k_test, pairs_refined_fp32=ranking.num_pairs_refined)
    metrics.update(precision=precision, encode_precision=precision if encode_precision is None else encode_precision,
                   seconds=time.perf_counter() - start)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Grounding
# ----------------------------------------------------------------------------------------------------------------


def grounding_accuracy(
    gt_xywh: torch.Tensor, pred_xywh: torch.Tensor, groups: Sequence[str] | None = None, threshold: float = 0.5
) -> dict[str, Any]:
    """Acc@IoU>=threshold (percent) of pixel ``xywh`` predictions with the official inclusive-pixel IoU, overall
    and per group; also the mean IoU."""
    iou = inclusive_pixel_iou(torch.as_tensor(gt_xywh, dtype=torch.float64), torch.as_tensor(pred_xywh, dtype=torch.float64))
    correct = (iou >= threshold).double()
    result: dict[str, Any] = {
        "acc@0.5" if threshold == 0.5 else f"acc@{threshold}": 100.0 * float(correct.mean()) if len(correct) else 0.0,
        "mean_iou": float(iou.mean()) if len(iou) else 0.0,
        "num_examples": int(len(correct)),
    }
    if groups is not None:
        per: dict[str, list[int]] = defaultdict(list)
        for k, g in enumerate(groups):
            per[str(g)].append(k)
        if len(per) > 1 or (len(per) == 1 and "" not in per):
            result["groups"] = {
                g: {"acc@0.5": 100.0 * float(correct[idx].mean()), "num_examples": len(idx)}
                for g, idx in sorted(per.items())
            }
    return result


def _predict_boxes(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Normalised ``(cx, cy, w, h)`` predictions of a grounding model (or any model with ``xvlm`` + ``bbox_head``)."""
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    if type(model).__name__ == "XVLMForGrounding":
        return model(**inputs).pred_boxes
    xvlm = model.xvlm
    image = xvlm.encode_image(inputs["pixel_values"]).last_hidden_state
    text = xvlm.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    fused = xvlm.fuse(text, inputs["attention_mask"], image)
    return model.bbox_head(fused[:, 0]).sigmoid()


@torch.no_grad()
def evaluate_grounding(
    model: Any,
    processor: Any,
    dataset: Any,
    batch_size: int = 64,
    max_examples: int | None = None,
    device: torch.device | str | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Official box-grounding evaluation on a ``grounding``-schema dataset (rows ``image``, ``text``, ``bbox``
    (xywh pixels), optional ``group``).

    Returns ``acc@0.5`` (percent), ``mean_iou``, per-group accuracy, ``prior_baseline`` (Acc@0.5 of always
    predicting the mean ground-truth box of this set, in normalised coordinates: a generous "no model" level),
    ``num_examples`` and ``seconds`` (with ``return_predictions``, also ``predictions``: pixel ``xywh`` boxes).
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    collator = XVLMGroundingCollator(processor, box_format="xywh", return_target_sizes=True)
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    preds, gts, groups, norm_targets, sizes = [], [], [], [], []
    for first in range(0, n, batch_size):
        rows = [dataset[i] for i in range(first, min(first + batch_size, n))]
        batch = collator(rows)
        target_sizes = batch.pop("target_sizes")
        norm_targets.append(batch.pop("labels"))
        batch = {k: v.to(device) for k, v in batch.items()}
        pred = _predict_boxes(model, batch).float().cpu()
        boxes = processor.post_process_grounding(pred, target_sizes=target_sizes, box_format="xywh")
        preds.extend(b["boxes"][0] for b in boxes)
        gts.extend(torch.tensor(list(r["bbox"]), dtype=torch.float64) for r in rows)
        groups.extend(str(r.get("group", "") or "") for r in rows)
        sizes.append(target_sizes)
    pred_xywh = torch.stack(preds).double()
    gt_xywh = torch.stack(gts)
    result = grounding_accuracy(gt_xywh, pred_xywh, groups)
    # Prior baseline: the mean normalised target box, mapped to each image.
    prior = torch.cat(norm_targets).double().mean(dim=0)
    hw = torch.cat(sizes).double()
    cx, cy, w, h = prior.tolist()
    prior_xywh = torch.stack(
        [(cx - w / 2) * hw[:, 1], (cy - h / 2) * hw[:, 0], w * hw[:, 1], h * hw[:, 0]], dim=1
    )
    result["prior_baseline"] = grounding_accuracy(gt_xywh, prior_xywh)["acc@0.5"]
    result["seconds"] = time.perf_counter() - start
    if return_predictions:
        result["predictions"] = pred_xywh.tolist()
    model.train(was_training)
    return result


# ----------------------------------------------------------------------------------------------------------------
# NLVR2
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_nlvr2(
    model: Any,
    processor: Any,
    dataset: Any,
    batch_size: int = 64,
    max_examples: int | None = None,
    device: torch.device | str | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Official NLVR2 evaluation (``NLVR.py::evaluate``) on rows ``left_image``, ``right_image``, ``sentence``,
    ``label`` (1 = true): both images resized (official ``test_transform``), ``argmax`` of the logits, accuracy.

    Args:
        model: ``XVLMForImagesAndTextClassification``.
        processor: ``XVLMProcessor``.
        dataset: NLVR2 rows (a list of dicts or a ``datasets.Dataset``).
        batch_size: examples per forward.
        max_examples: evaluate on the first ``max_examples`` rows only.
        device: the model's device (default: where the model is).
        return_predictions: also return ``predictions`` (the predicted class of each row).

    Returns:
        ``accuracy`` (percent), ``num_examples``, ``majority_baseline`` (percent of the most frequent label),
        ``seconds`` (and ``predictions``).
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    collator = XVLMNLVR2Collator(processor)
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    if n == 0:
        raise ValueError("no NLVR2 rows to evaluate")
    preds: list[int] = []
    labels: list[int] = []
    try:
        for first in range(0, n, batch_size):
            batch = collator([dataset[i] for i in range(first, min(first + batch_size, n))])
            if "labels" not in batch:
                raise ValueError("NLVR2 evaluation needs a label in every row")
            labels.extend(batch.pop("labels").tolist())
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits
            preds.extend(logits.argmax(dim=-1).tolist())
    finally:
        model.train(was_training)
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    majority = max(labels.count(0), labels.count(1))
    result: dict[str, Any] = {
        "accuracy": 100.0 * correct / n,
        "num_examples": n,
        "majority_baseline": 100.0 * majority / n,
        "seconds": time.perf_counter() - start,
    }
    if return_predictions:
        result["predictions"] = preds
    return result


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table (markdown pipe syntax)."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in cells)])


def retrieval_table(metrics: dict[str, Any]) -> str:
    chance = metrics.get("chance", {})
    rows = [
        ["text retrieval (image->text)", metrics["txt_r1"], metrics["txt_r5"], metrics["txt_r10"],
         metrics["itc_txt_r1"], chance.get("txt_r1", math.nan)],
        ["image retrieval (text->image)", metrics["img_r1"], metrics["img_r5"], metrics["img_r10"],
         metrics["itc_img_r1"], chance.get("img_r1", math.nan)],
    ]
    table = format_table(rows, ["direction", "R@1", "R@5", "R@10", "ITC-only R@1", "chance R@1"])
    return (
        f"{table}\nr_mean {metrics['r_mean']:.2f} ({metrics['num_images']} images, {metrics['num_texts']} texts, "
        f"k_test {metrics['k_test']})"
    )


def nlvr2_table(metrics: dict[str, Any]) -> str:
    rows = [["accuracy", metrics["accuracy"], metrics["majority_baseline"], metrics["num_examples"]]]
    return format_table(rows, ["metric", "value (%)", "majority baseline (%)", "n"])


def grounding_table(metrics: dict[str, Any]) -> str:
    rows = [["all", metrics["acc@0.5"], metrics["mean_iou"], metrics["num_examples"]]]
    for g, m in (metrics.get("groups") or {}).items():
        rows.append([g, m["acc@0.5"], "", m["num_examples"]])
    table = format_table(rows, ["group", "Acc@0.5", "mean IoU", "n"])
    extra = f"\nprior baseline (mean box) Acc@0.5 {metrics['prior_baseline']:.2f}"
    if "chance" in metrics:
        extra += f"; random-object chance {metrics['chance']:.2f}"
    return table + extra


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def load_processor(model_path: str, tokenizer: str | None = None, image_size: int | None = None, patch_size: int | None = None):
    """The ``XVLMProcessor`` saved next to a model, or one built from ``tokenizer`` (the synthetic tokenizer when
    ``tokenizer == "synthetic"``) and the model's input size."""
    if tokenizer is None:
        try:
            return XVLMProcessor.from_pretrained(model_path)
        except (OSError, ValueError, TypeError) as error:
            raise SystemExit(
                f"no processor found in {model_path!r} ({error}); pass --tokenizer (a tokenizer path / Hub id, or "
                "'synthetic' for the synthetic dataset)"
            ) from None
    if tokenizer == "synthetic":
        tok = synthetic_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    size = {"height": image_size, "width": image_size} if image_size else None
    kwargs = {"size": size} if size else {}
    if patch_size:
        kwargs["patch_size"] = patch_size
    return XVLMProcessor(image_processor=XVLMImageProcessorPil(**kwargs), tokenizer=tok)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvlm-eval",
        description="Evaluate an X-VLM model with the official retrieval / grounding / NLVR2 protocols; prints a "
        "table and "
        "writes JSON.",
    )
    parser.add_argument("task", choices=["retrieval", "grounding", "nlvr2"])
    parser.add_argument("--model", required=True, help="model folder or Hub id (save_pretrained format)")
    parser.add_argument("--dataset", default=None, help="dataset folder or Hub id (default: the synthetic dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tokenizer", default=None, help="only when the model folder has no processor")
    parser.add_argument("--k-test", type=int, default=128, help="retrieval: ITC candidates re-ranked by ITM")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-examples", type=int, default=None,
                        help="images (retrieval) / expressions (grounding) / sentences (nlvr2)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="retrieval: precision of the ITM re-ranking (bf16: autocast, near ties re-scored in "
                        "fp32 so that each query keeps the fp32 top-1 among its candidates)")
    parser.add_argument("--encode-precision", choices=["fp32", "bf16"], default=None,
                        help="retrieval: precision of the image/text encoders (default: --precision); fp32 keeps "
                        "the fp32 ITC candidates, so a bf16 re-ranking keeps the fp32 top-1 exactly")
    parser.add_argument("--output", default=None, help="JSON file for the metrics (default: print only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cls = {"retrieval": XVLMForRetrieval, "grounding": XVLMForGrounding,
           "nlvr2": XVLMForImagesAndTextClassification}[args.task]
    model = cls.from_pretrained(args.model).to(device)
    processor = load_processor(args.model, args.tokenizer, model.config.image_size, model.config.patch_stride)
    dataset = load_xvlm_dataset(args.dataset, args.task, args.split)
    if args.task == "retrieval":
        metrics = evaluate_retrieval(model, processor, dataset, args.k_test, args.batch_size, args.max_examples, device,
                                     precision=args.precision, encode_precision=args.encode_precision)
        print(retrieval_table(metrics))
    elif args.task == "nlvr2":
        metrics = evaluate_nlvr2(model, processor, dataset, args.batch_size, args.max_examples, device)
        print(nlvr2_table(metrics))
    else:
        metrics = evaluate_grounding(model, processor, dataset, args.batch_size, args.max_examples, device)
        print(grounding_table(metrics))
    metrics = {"task": args.task, "model": args.model, "dataset": args.dataset or "synthetic", "split": args.split,
               **metrics}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
