"""Evaluation with the official X-VLM protocols, and the ``xvlm-eval`` command.

* Retrieval (official ``Retrieval.py::evaluation`` + ``itm_eval``, official `Retrieval.py`): every image and text is
  encoded once; the ITC cosine similarity picks the top ``k_test`` candidates in both directions; candidates are
  re-ranked by the raw ITM "match" logit; R@1/5/10 for text retrieval (``txt_r*``, an image's rank is the best rank
  of its ground-truth captions) and image retrieval (``img_r*``), their means and ``r_mean``.
* Grounding (official ``Grounding_bbox.py``): the predicted ``(cx, cy, w, h)`` is mapped back to pixels of the
  original image and compared with the ground truth by the official inclusive-pixel IoU (``computeIoU``); a
  prediction is correct when IoU >= 0.5. Accuracy is reported overall and per ``group`` (RefCOCO+ ``val`` /
  ``testA`` / ``testB``, synthetic ``seen`` / ``heldout``). ``method="gradcam"`` (official ``Grounding.py``,
  weakly supervised, on a retrieval model): the Grad-CAM map of each expression
  (``XVLMForRetrieval.compute_gradcam``, texts padded to the longest of batches of 20 as officially) ranks the
  row's ``candidate_boxes`` (official ``dets.json``; ``XVLMProcessor.post_process_gradcam``), and the chosen box is
  scored the same way.
* NLVR2 (official ``NLVR.py::evaluate``): evaluation transform (square bicubic resize) for both images, the
  predicted class is the argmax of the 2-way logits, accuracy = mean of ``prediction == label`` over the split
  (percent; the official per-batch accuracies are averaged weighted by batch size, which is the same number).
* VQA (official ``VQA.py::evaluation``, ``model_vqa.rank_answer``): the candidate answers are tokenised once, each
  question (``pre_question``, 50 words, as the official test split) is ranked over them with the official two-stage
  ranking (``XVLMForQuestionAnswering.rank_answers``, ``k_test`` 128) and the best candidate is the answer. The
  result list ``[{"question_id", "answer"}]`` is the file the VQA evaluation server takes; when the rows have
  annotator answers, :func:`vqa_metrics` adds the official exact match and the soft VQA accuracy.
* Captioning (official ``Captioning.py::evaluation`` + ``coco_caption_eval``): images resized square, the official
  beam search from the prompt ``[CLS] a picture of``, captions decoded as officially; the result list
  ``[{"image_id", "caption"}]`` (deduplicated by ``image_id``) is the official result file, scored with
  pycocoevalcap (BLEU-4, METEOR, ROUGE-L, CIDEr) next to a constant-caption and a nearest-neighbour baseline.

Usage::

    xvlm-eval retrieval --model out/retrieval --split test --k-test 128 --output retrieval.json
    xvlm-eval grounding --model out/grounding --dataset my-refcoco-folder --split test
    xvlm-eval grounding --method gradcam --model out/refcoco-weak --dataset my-refcoco-folder --split test
    xvlm-eval nlvr2 --model out/nlvr2 --dataset my-nlvr2-folder --split test
    xvlm-eval vqa --model out/vqa --dataset my-vqa-folder --split test --output result.json
    xvlm-eval captioning --model out/captioning --dataset my-coco-captions --split test --output result.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoTokenizer

from ..box_ops import inclusive_pixel_iou
from ..cli_errors import cli_errors, ensure_writable_dir, require_model_source
from ..caption_metrics import CAPTION_METRICS, DEFAULT_CAPTION_METRICS, caption_metrics
from ..data import coco_image_id, load_coco_caption_references, load_xvlm_dataset, synthetic_tokenizer
from ..modeling_xvlm_captioning import XVLMForConditionalGeneration
from ..modeling_xvlm_grounding import XVLMForGrounding
from ..modeling_xvlm_nlvr import XVLMForImagesAndTextClassification
from ..modeling_xvlm_retrieval import XVLMForRetrieval
from ..modeling_xvlm_vqa import DEFAULT_K_TEST, XVLMForQuestionAnswering
from ..processing import XVLMImageProcessorPil, XVLMProcessor, load_image_rgb, pre_caption
from ..quantization import quantize_int8
from ..retrieval import batch_slices, retrieval_metrics, retrieve, score_matrices
from .collators import XVLMNLVR2Collator, encode_questions, pixel_values_from_pil
from .data import caption_lists
from .region_collators import XVLMGroundingCollator

__all__ = [
    "evaluate_retrieval",
    "evaluate_grounding",
    "evaluate_nlvr2",
    "evaluate_vqa",
    "evaluate_captioning",
    "caption_metrics_setup",
    "caption_result_ids",
    "colour_histogram",
    "most_frequent_caption",
    "nearest_neighbour_captions",
    "grounding_accuracy",
    "majority_answer",
    "vqa_metrics",
    "vqa_soft_accuracy",
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
    progress: bool = False,
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
        progress: a progress bar over the batches (``xvlm-eval``; ``--no-progress`` turns it off).
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
            top1_margin=top1_margin if precision == "bf16" else None, num_images=n, progress=progress,
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


#: Grounding methods of :func:`evaluate_grounding` (``xvlm-eval grounding --method``).
GROUNDING_METHODS = ("box", "gradcam")
#: The official evaluation batch of weakly supervised grounding (``configs/Grounding.yaml``); it matters, because
#: texts are padded to the longest of the batch and the official map averages over the padded positions.
GRADCAM_BATCH_SIZE = 20


def _row_candidates(row: dict[str, Any], position: int) -> list[list[float]]:
    boxes = row.get("candidate_boxes")
    if not boxes:
        raise ValueError(
            f"grounding row {position} (ref_id {row.get('ref_id')!r}) has no candidate_boxes: --method gradcam ranks "
            "candidate boxes (convert the official dets.json with `xvlm-data convert-official --refcoco-dets`)"
        )
    return [[float(v) for v in box] for box in boxes]


def _gradcam_boxes(
    model: Any, processor: Any, batch: dict[str, torch.Tensor], target_sizes: torch.Tensor,
    candidates: list[list[list[float]]], gradcam_layer: int | None, real_tokens_only: bool,
) -> list[torch.Tensor]:
    """Pixel ``xywh`` candidate chosen by each pair's Grad-CAM map (official ``Grounding.py`` + ``grounding_eval``)."""
    maps = model.compute_gradcam(
        batch["pixel_values"], batch["input_ids"], batch["attention_mask"], layer=gradcam_layer,
        real_tokens_only=real_tokens_only,
    ).cpu()
    chosen = processor.post_process_gradcam(maps, candidates, target_sizes)
    return [torch.tensor(boxes[c["index"]], dtype=torch.float64) for boxes, c in zip(candidates, chosen)]


def _candidate_chance(gt_xywh: torch.Tensor, candidates: list[list[list[float]]]) -> float:
    """Acc@0.5 (percent) of picking a candidate box uniformly at random (the expected value)."""
    fractions = [
        float((inclusive_pixel_iou(gt.expand(len(boxes), 4), torch.tensor(boxes, dtype=torch.float64)) >= 0.5)
              .double().mean())
        for gt, boxes in zip(gt_xywh, candidates)
    ]
    return 100.0 * sum(fractions) / len(fractions) if fractions else 0.0


@torch.no_grad()
def evaluate_grounding(
    model: Any,
    processor: Any,
    dataset: Any,
    batch_size: int | None = None,
    max_examples: int | None = None,
    device: torch.device | str | None = None,
    return_predictions: bool = False,
    method: str = "box",
    gradcam_layer: int | None = None,
    real_tokens_only: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Official grounding evaluation on a ``grounding``-schema dataset (rows ``image``, ``text``, ``bbox``
    (xywh pixels), optional ``group``, and ``candidate_boxes`` for ``method="gradcam"``).

    ``method``: ``"box"`` (official ``Grounding_bbox.py``: the box head's prediction; a grounding model) or
    ``"gradcam"`` (official ``Grounding.py``: the candidate box that the Grad-CAM map of fusion layer
    ``gradcam_layer`` (default ``config.default_gradcam_layer``) covers best; a retrieval model;
    ``real_tokens_only`` as in ``compute_gradcam``). ``batch_size`` default: 64 for boxes, the official 20 for
    Grad-CAM (the official map depends on the batch's padding). ``progress``: a progress bar over the batches.

    Returns ``acc@0.5`` (percent), ``mean_iou``, per-group accuracy, ``prior_baseline`` (Acc@0.5 of always
    predicting the mean ground-truth box of this set, in normalised coordinates: a generous "no model" level),
    for ``"gradcam"`` also ``chance`` (Acc@0.5 of a random candidate box), ``method``, ``num_examples`` and
    ``seconds`` (with ``return_predictions``, also ``predictions``: pixel ``xywh`` boxes).
    """
    if method not in GROUNDING_METHODS:
        raise ValueError(f"method must be one of {GROUNDING_METHODS}, got {method!r}")
    if method == "gradcam" and not hasattr(model, "compute_gradcam"):
        raise ValueError(
            f"method 'gradcam' needs a retrieval model (XVLMForRetrieval, official Grounding.py), got "
            f"{type(model).__name__}"
        )
    if batch_size is None:
        batch_size = GRADCAM_BATCH_SIZE if method == "gradcam" else 64
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    collator = XVLMGroundingCollator(processor, box_format="xywh", return_target_sizes=True)
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    preds, gts, groups, norm_targets, sizes, all_candidates = [], [], [], [], [], []
    for part in batch_slices(n, batch_size, "grounding", progress):
        rows = [dataset[i] for i in range(part.start, part.stop)]
        if method == "gradcam":
            candidates = [_row_candidates(r, part.start + j) for j, r in enumerate(rows)]
        batch = collator(rows)
        target_sizes = batch.pop("target_sizes")
        norm_targets.append(batch.pop("labels"))
        batch = {k: v.to(device) for k, v in batch.items()}
        if method == "gradcam":
            preds.extend(_gradcam_boxes(model, processor, batch, target_sizes, candidates, gradcam_layer,
                                        real_tokens_only))
            all_candidates.extend(candidates)
        else:
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
    if method == "gradcam":
        result["chance"] = _candidate_chance(gt_xywh, all_candidates)
    result["method"] = method
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
    progress: bool = False,
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
        progress: a progress bar over the batches (``xvlm-eval``; ``--no-progress`` turns it off).
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
        for part in batch_slices(n, batch_size, "NLVR2", progress):
            batch = collator([dataset[i] for i in range(part.start, part.stop)])
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
# VQA
# ----------------------------------------------------------------------------------------------------------------


def _normalise_answer(answer: str) -> str:
    return answer.strip().lower()


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The soft VQA accuracy of one prediction, in ``[0, 1]``: ``min(#annotators who gave it / 3, 1)``, answers
    compared after ``strip().lower()``. (The VQA server also averages over the 10 leave-one-annotator-out subsets and
    normalises punctuation, articles and number words, so its numbers can differ slightly.) With fewer than three
    annotator answers a question scores at most ``len(answers) / 3``: on one-answer data (VLUE) read the exact
    match."""
    if not answers:
        raise ValueError("the soft VQA accuracy needs the annotator answers, got none")
    predicted = _normalise_answer(prediction)
    return min(sum(_normalise_answer(a) == predicted for a in answers) / 3.0, 1.0)


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent annotator answer (the first one seen among ties), stripped: the single ground truth of a
    question for the official exact match."""
    if not answers:
        raise ValueError("no answers to take the majority of")
    return Counter(a.strip() for a in answers).most_common(1)[0][0]


def vqa_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """VQA metrics of predicted answer strings against the annotator answers of each question (rows whose
    ``answers`` are empty, e.g. test questions, are left out).

    Returns:
        ``exact_match`` (percent; official ``VQA.py::calculate_acc``: ``prediction.strip() == ground truth``, the
        ground truth being the single VLUE-style answer, here :func:`majority_answer` of the annotator answers),
        ``vqa_accuracy`` (percent; mean :func:`vqa_soft_accuracy`), ``majority_answer`` and
        ``majority_answer_accuracy`` (the soft accuracy of always answering the most frequent annotator answer of
        *these* rows: an optimistic "no model" level, since it peeks at the evaluated answers) and
        ``num_annotated``; the metrics are ``None`` when no row has answers.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} questions")
    pairs = [(p, list(a)) for p, a in zip(predictions, answers) if a]
    if not pairs:
        return {"exact_match": None, "vqa_accuracy": None, "majority_answer": None,
                "majority_answer_accuracy": None, "num_annotated": 0}
    exact = sum(p.strip() == majority_answer(a) for p, a in pairs)
    soft = sum(vqa_soft_accuracy(p, a) for p, a in pairs)
    common = Counter(_normalise_answer(x) for _, a in pairs for x in a).most_common(1)[0][0]
    baseline = sum(vqa_soft_accuracy(common, a) for _, a in pairs)
    return {
        "exact_match": 100.0 * exact / len(pairs),
        "vqa_accuracy": 100.0 * soft / len(pairs),
        "majority_answer": common,
        "majority_answer_accuracy": 100.0 * baseline / len(pairs),
        "num_annotated": len(pairs),
    }


@torch.no_grad()
def evaluate_vqa(
    model: Any,
    processor: Any,
    dataset: Any,
    answer_list: Sequence[str],
    batch_size: int = 32,
    k_test: int = DEFAULT_K_TEST,
    max_examples: int | None = None,
    official_answer_scoring: bool | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Official VQA evaluation (``VQA.py::evaluation``) on rows ``question_id``, ``image``, ``question`` and
    (optionally) ``answers``.

    The candidates are encoded once (``processor.encode_answers``); each batch of questions (``pre_question`` at 50
    words, not truncated below the model's position limit, as the official test split; images resized square,
    bicubic) is ranked over them by
    ``model.rank_answers`` (official ``k_test`` 128) and the best candidate is the answer.

    Args:
        model: ``XVLMForQuestionAnswering``.
        processor: ``XVLMProcessor``.
        dataset: VQA rows (a list of dicts or a ``datasets.Dataset``).
        answer_list: the candidate answers (official ``answer_list.json``, :func:`modeling_xvlm.data.load_vqa_answer_list`).
        batch_size: questions per forward (official ``batch_size_test`` 32).
        k_test: candidates re-scored per question.
        max_examples: evaluate on the first ``max_examples`` rows only.
        official_answer_scoring: see ``rank_answers`` (default: the model config's).
        device: the model's device (default: where the model is).
        progress: a progress bar over the batches (``xvlm-eval``; ``--no-progress`` turns it off).

    Returns:
        ``results`` (``[{"question_id", "answer"}]``, the official result file), :func:`vqa_metrics`
        (``exact_match``, ``vqa_accuracy``, ``majority_answer_accuracy``..., ``None`` without annotations),
        ``num_examples``, ``k_test`` and ``seconds``.
    """
    start = time.perf_counter()
    answer_list = list(answer_list)
    candidates = processor.encode_answers(answer_list)  # ValueError for an empty or malformed list
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    answer_ids, answer_mask = candidates["input_ids"].to(device), candidates["attention_mask"].to(device)
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    if n == 0:
        raise ValueError("no VQA rows to evaluate")
    max_tokens = model.config.text_config.max_position_embeddings
    results: list[dict[str, Any]] = []
    annotations: list[list[str]] = []
    try:
        for part in batch_slices(n, batch_size, "VQA", progress):
            rows = [dataset[i] for i in range(part.start, part.stop)]
            pixel_values = pixel_values_from_pil([r["image"] for r in rows], processor.image_processor)
            ids, mask = encode_questions(processor, [r["question"] for r in rows], max_words=50, max_length=max_tokens)
            ranking = model.rank_answers(
                pixel_values.to(device), ids.to(device), mask.to(device), answer_ids, answer_mask, k=k_test,
                official_answer_scoring=official_answer_scoring,
            )
            for row, best in zip(rows, ranking.candidate_indices[:, 0].tolist()):
                results.append({"question_id": int(row["question_id"]), "answer": answer_list[best]})
                annotations.append(list(row.get("answers") or []))
    finally:
        model.train(was_training)
    metrics = vqa_metrics([r["answer"] for r in results], annotations)
    return {"results": results, **metrics, "num_examples": n, "k_test": min(int(k_test), len(answer_list)),
            "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------------------
# Captioning
# ----------------------------------------------------------------------------------------------------------------


def java_available() -> bool:
    """Whether a ``java`` executable is on ``PATH`` (pycocoevalcap's PTB tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def caption_metrics_setup(
    metrics: Sequence[str] = DEFAULT_CAPTION_METRICS, tokenizer: str | None = None
) -> tuple[tuple[str, ...], str, str | None]:
    """``(metrics, tokenizer, note)`` for :func:`~modeling_xvlm.caption_metrics.caption_metrics`: ``tokenizer=None``
    is the official PTB tokenizer when Java is on ``PATH``; without Java, the simple tokenizer and no METEOR (both
    need Java), with a ``note`` saying so."""
    metrics = tuple(metrics)
    if tokenizer is not None:
        return metrics, tokenizer, None
    if java_available():
        return metrics, "ptb", None
    kept = tuple(m for m in metrics if m != "METEOR")
    note = ("Java not found: the simple tokenizer instead of the PTB tokenizer" +
            (", METEOR skipped" if len(kept) < len(metrics) else "") + " (install a Java runtime for the official "
            "COCO numbers)")
    return kept, "simple", note


def caption_result_ids(image_ids: Sequence[Any]) -> list[Any]:
    """The ``image_id`` of each row in the result file: the numeric COCO id (official
    ``coco_karpathy_caption_eval``, :func:`modeling_xvlm.data.coco_image_id`) when every id has one, else the ids as
    they are (e.g. the synthetic ``test-000012``)."""
    try:
        return [coco_image_id(i) for i in image_ids]
    except (TypeError, ValueError):
        return list(image_ids)


def most_frequent_caption(captions_per_image: Sequence[Sequence[str]], max_words: int | None = 40) -> str:
    """The most frequent training caption after the official ``pre_caption`` (the first one seen among ties): the
    constant-caption baseline."""
    counts = Counter(pre_caption(c, max_words) for captions in captions_per_image for c in captions)
    if not counts:
        raise ValueError("no training captions for the constant-caption baseline")
    return counts.most_common(1)[0][0]


def colour_histogram(image: Any, bins: int = 4, size: int = 32) -> np.ndarray:
    """The joint RGB histogram (``bins`` per channel, L1-normalised) of ``image`` resized to ``size`` x ``size``: the
    model-free feature of the nearest-neighbour baseline."""
    pixels = np.asarray(load_image_rgb(image).resize((size, size), PIL.Image.Resampling.BILINEAR), dtype=np.int64)
    q = pixels * bins // 256
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    hist = np.bincount(codes.ravel(), minlength=bins**3).astype(np.float64)
    return hist / hist.sum()


def nearest_neighbour_captions(
    train_dataset: Any, queries: Sequence[np.ndarray], max_train_images: int | None = None
) -> list[str]:
    """For each query histogram, the first caption of the training image with the most similar
    :func:`colour_histogram` (histogram intersection, the first image among ties): the nearest-neighbour
    baseline. ``max_train_images``: search the first ones only."""
    n = len(train_dataset) if max_train_images is None else min(len(train_dataset), max_train_images)
    captions = caption_lists(train_dataset, n)
    keep = [i for i in range(n) if captions[i]]
    if not keep:
        raise ValueError("no captioned training images for the nearest-neighbour baseline")
    bank = np.stack([colour_histogram(train_dataset[i]["image"]) for i in keep])
    best = [int(np.minimum(bank, q[None]).sum(axis=1).argmax()) for q in queries]
    return [captions[keep[b]][0] for b in best]


def _caption_scores(
    predictions: dict[Any, str], references: dict[Any, list[str]], metrics: Sequence[str], tokenizer: str
) -> dict[str, float]:
    return caption_metrics({i: predictions[i] for i in references}, references, metrics, tokenizer)


@torch.no_grad()
def evaluate_captioning(
    model: Any,
    processor: Any,
    dataset: Any,
    batch_size: int = 32,
    max_examples: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    *,
    prompt: str | None = None,
    official_beam_scoring: bool = True,
    references: dict[Any, Sequence[str]] | None = None,
    train_dataset: Any = None,
    baseline_max_train_images: int | None = None,
    metrics: Sequence[str] = DEFAULT_CAPTION_METRICS,
    metrics_tokenizer: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Official captioning evaluation (``Captioning.py::evaluation`` + ``coco_caption_eval``) on ``retrieval``
    rows (``image``, ``image_id``, ``captions``: the references).

    Images are resized square (bicubic, official ``test_transform``); ``model.generate`` continues the prompt
    ``[CLS] a picture of`` (official beam search: 3 beams, lengths 5 to 20 with the prompt, from the model's
    ``generation_config``; ``generate_kwargs`` override them); captions are decoded as officially
    (``XVLMProcessor.post_process_captions``). The result list is deduplicated by ``image_id`` (the first row of an
    id wins, official ``collect_result(remove_duplicate='image_id')``) and scored with pycocoevalcap
    (:func:`~modeling_xvlm.caption_metrics.caption_metrics`: BLEU-4, METEOR, ROUGE-L, CIDEr; without Java the simple
    tokenizer and no METEOR, see :func:`caption_metrics_setup`).

    Args:
        model: ``XVLMForConditionalGeneration``.
        processor: ``XVLMProcessor``.
        dataset: ``retrieval`` rows (a list of dicts or a ``datasets.Dataset``).
        batch_size: images per ``generate`` (official ``batch_size_test`` 32).
        max_examples: evaluate on the first ``max_examples`` rows only.
        generate_kwargs: ``generate`` options (``num_beams``, ``max_length``, ``min_length``, ...).
        prompt: the generation prompt; default the processor's ``prompt`` (official ``'a picture of '``, saved with
            the processor by ``xvlm-train``; ``""`` starts from ``[CLS]``).
        official_beam_scoring: the official 4.12.5 beam search (``False``: transformers' own).
        references: ``{result image_id: [captions]}`` (e.g. ``load_coco_caption_references`` of the official
            ``_gt.json``) instead of the rows' ``captions``.
        train_dataset: training ``retrieval`` rows for the baselines: the most frequent training caption for every
            image (``constant``) and the first caption of the training image with the closest colour histogram
            (``nearest_neighbour``, model-free); ``None``: no baselines.
        baseline_max_train_images: the nearest-neighbour search looks at the first ones only.
        metrics, metrics_tokenizer: see :func:`caption_metrics_setup`.
        device: the model's device (default: where the model is).
        progress: a progress bar over the batches (``xvlm-eval``; ``--no-progress`` turns it off).

    Returns:
        ``results`` (``[{"image_id", "caption"}]``, the official result file), the metrics (fractions, as
        pycocoevalcap: ``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr``; absent without references),
        ``metrics_tokenizer``, ``metrics_note`` (``None`` or why the numbers are not the official ones),
        ``baselines`` (``{"constant": {"caption", metrics...}, "nearest_neighbour": {metrics...}}`` with
        ``train_dataset``), ``num_examples``, ``num_images`` (after deduplication) and ``seconds``.
    """
    start = time.perf_counter()
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    if n == 0:
        raise ValueError("no captioning rows to evaluate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        captions, histograms, rows_refs, ids = _generate_captions(
            model, processor, dataset, n, batch_size, device, prompt, official_beam_scoring,
            dict(generate_kwargs or {}), histograms=train_dataset is not None, progress=progress,
        )
    finally:
        model.train(was_training)
    result_ids = caption_result_ids(ids)
    first_of: dict[Any, int] = {}
    for k, image_id in enumerate(result_ids):
        first_of.setdefault(image_id, k)
    results = [{"image_id": i, "caption": captions[k]} for i, k in first_of.items()]
    if references is not None:
        refs = {i: list(references[i]) for i in first_of if i in references}
        if len(refs) < len(first_of):
            missing = [i for i in first_of if i not in references]
            raise ValueError(f"{len(missing)} evaluated images have no references (e.g. {missing[:5]})")
    else:
        refs = {i: rows_refs[k] for i, k in first_of.items() if rows_refs[k]}
    metrics, tokenizer, note = caption_metrics_setup(metrics, metrics_tokenizer)
    output: dict[str, Any] = {"results": results}
    if refs:
        if len(refs) < len(first_of):
            note = (note + "; " if note else "") + f"{len(first_of) - len(refs)} images without references not scored"
        predictions = {r["image_id"]: r["caption"] for r in results}
        output.update(_caption_scores(predictions, refs, metrics, tokenizer))
        if train_dataset is not None:
            output["baselines"] = _caption_baselines(train_dataset, first_of, histograms, refs, metrics, tokenizer,
                                                     baseline_max_train_images)
    output.update(metrics_tokenizer=tokenizer, metrics_note=note, num_examples=n, num_images=len(results),
                  seconds=time.perf_counter() - start)
    return output


def _generate_captions(
    model: Any, processor: Any, dataset: Any, n: int, batch_size: int, device: torch.device, prompt: str | None,
    official_beam_scoring: bool, options: dict[str, Any], histograms: bool, progress: bool = False,
) -> tuple[list[str], list[np.ndarray], list[list[str]], list[Any]]:
    """The captions of the first ``n`` rows, their colour histograms (when asked), references and ids."""
    captions: list[str] = []
    features: list[np.ndarray] = []
    references: list[list[str]] = []
    ids: list[Any] = []
    for part in batch_slices(n, batch_size, "captioning", progress):
        rows = [dataset[i] for i in range(part.start, part.stop)]
        images = [load_image_rgb(r["image"]) for r in rows]
        pixel_values = pixel_values_from_pil(images, processor.image_processor).to(device)
        prompts = processor.caption_prompt(len(rows), prompt).to(device)
        out = model.generate(pixel_values, input_ids=prompts, official_beam_scoring=official_beam_scoring, **options)
        captions.extend(processor.post_process_captions(out, prompt))
        if histograms:
            features.extend(colour_histogram(image) for image in images)
        references.extend(list(r.get("captions") or []) for r in rows)
        ids.extend(r.get("image_id", part.start + k) for k, r in enumerate(rows))
    return captions, features, references, ids


def _caption_baselines(
    train_dataset: Any, first_of: dict[Any, int], histograms: list[np.ndarray], refs: dict[Any, list[str]],
    metrics: Sequence[str], tokenizer: str, max_train_images: int | None,
) -> dict[str, Any]:
    constant = most_frequent_caption(caption_lists(train_dataset))
    nearest = nearest_neighbour_captions(train_dataset, [histograms[k] for k in first_of.values()], max_train_images)
    return {
        "constant": {"caption": constant, **_caption_scores({i: constant for i in refs}, refs, metrics, tokenizer)},
        "nearest_neighbour": _caption_scores(dict(zip(first_of, nearest)), refs, metrics, tokenizer),
    }


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


def vqa_table(metrics: dict[str, Any]) -> str:
    rows = [["VQA accuracy (soft)", metrics["vqa_accuracy"], metrics["majority_answer_accuracy"], metrics["num_annotated"]],
            ["exact match (majority answer)", metrics["exact_match"], "", metrics["num_annotated"]]]
    table = format_table(rows, ["metric", "value (%)", "majority-answer baseline (%)", "n"])
    return f"{table}\n{metrics['num_examples']} questions, k_test {metrics['k_test']}"


def captioning_table(metrics: dict[str, Any]) -> str:
    """The caption metrics (x100, as papers report them) of the model and, when computed, the baselines."""
    names = [m for m in CAPTION_METRICS if m in metrics]
    baselines = metrics.get("baselines") or {}
    header = ["metric (x100)", "model"] + (["constant caption", "nearest neighbour (colour)"] if baselines else [])
    rows = []
    for name in names:
        row = [name, 100.0 * metrics[name]]
        if baselines:
            row += [100.0 * baselines["constant"][name], 100.0 * baselines["nearest_neighbour"][name]]
        rows.append(row)
    table = format_table(rows, header)
    extra = f"\n{metrics['num_images']} images, {metrics['metrics_tokenizer']} tokenizer"
    if baselines:
        extra += f"; constant caption: {baselines['constant']['caption']!r}"
    if metrics.get("metrics_note"):
        extra += f"\nnote: {metrics['metrics_note']}"
    return table + extra


def grounding_table(metrics: dict[str, Any]) -> str:
    rows = [["all", metrics["acc@0.5"], metrics["mean_iou"], metrics["num_examples"]]]
    for g, m in (metrics.get("groups") or {}).items():
        rows.append([g, m["acc@0.5"], "", m["num_examples"]])
    table = format_table(rows, ["group", "Acc@0.5", "mean IoU", "n"])
    extra = f"\nprior baseline (mean box) Acc@0.5 {metrics['prior_baseline']:.2f}"
    if "chance" in metrics:
        what = "random-candidate" if metrics.get("method") == "gradcam" else "random-object"
        extra += f"; {what} chance {metrics['chance']:.2f}"
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


#: The protocol of each `xvlm-eval` task (official script), for `--help`.
EVAL_TASK_HELP = {
    "retrieval": "R@1/5/10 both ways, ITC top-k re-ranked by ITM (Retrieval.py)",
    "grounding": "Acc@0.5 of the predicted box (--method box, Grounding_bbox.py) or of the Grad-CAM choice among "
    "candidate boxes (--method gradcam, Grounding.py)",
    "nlvr2": "accuracy (NLVR.py)",
    "vqa": "answers ranked over the answer list, VQA accuracy and the result file (VQA.py)",
    "captioning": "beam-search captions, BLEU-4 / METEOR / ROUGE-L / CIDEr and the result file (Captioning.py)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvlm-eval",
        description="Evaluate an X-VLM model with the official retrieval / grounding / NLVR2 / VQA / captioning "
        "protocols; prints a table and writes JSON (--output).",
    )
    parser.add_argument("task", choices=list(EVAL_TASK_HELP), metavar="TASK",
                        help="; ".join(f"{task}: {what}" for task, what in EVAL_TASK_HELP.items()))
    parser.add_argument("--model", required=True, help="model folder or Hub id (save_pretrained format)")
    parser.add_argument("--dataset", default=None, help="dataset folder or Hub id (default: the synthetic dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tokenizer", default=None, help="only when the model folder has no processor")
    parser.add_argument("--k-test", type=int, default=128, help="retrieval: ITC candidates re-ranked by ITM; vqa: "
                        "candidate answers re-scored per question (official 128)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 for vqa and captioning (official), "
                        "64 otherwise")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="images (retrieval, captioning) / expressions (grounding) / sentences (nlvr2) / "
                        "questions (vqa)")
    parser.add_argument("--answer-list", default=None, help="vqa: JSON list of candidate answers (default: the "
                        "dataset's answer list)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--int8", action="store_true",
                        help="CPU only: int8 dynamic quantization of the text, fusion and decoder linear layers "
                        "(modeling_xvlm.quantize_int8; faster, not bit-equal to fp32)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars (encoding and re-ranking; batches of the other tasks)")
    parser.add_argument("--method", choices=list(GROUNDING_METHODS), default="box",
                        help="grounding: 'box' (a grounding model's box head, official Grounding_bbox.py) or "
                        "'gradcam' (a retrieval model's Grad-CAM map ranking the rows' candidate_boxes, official "
                        "Grounding.py; batch size default 20 as officially)")
    parser.add_argument("--gradcam-layer", type=int, default=None,
                        help="grounding --method gradcam: the fusion layer (official block_num; default the "
                        "config's default_gradcam_layer, 9 for base)")
    parser.add_argument("--real-tokens-only", action="store_true",
                        help="grounding --method gradcam: average the map over each text's real tokens (official: "
                        "over the padded length)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="retrieval: precision of the ITM re-ranking (bf16: autocast, near ties re-scored in "
                        "fp32 so that each query keeps the fp32 top-1 among its candidates)")
    parser.add_argument("--encode-precision", choices=["fp32", "bf16"], default=None,
                        help="retrieval: precision of the image/text encoders (default: --precision); fp32 keeps "
                        "the fp32 ITC candidates, so a bf16 re-ranking keeps the fp32 top-1 exactly")
    parser.add_argument("--output", default=None, help="JSON file for the metrics (vqa: the official result file, "
                        "a list of {question_id, answer}; captioning: a list of {image_id, caption}; default: print "
                        "only)")
    parser.add_argument("--metrics-output", default=None, help="vqa, captioning: JSON file for the metrics")
    g = parser.add_argument_group("captioning")
    g.add_argument("--num-beams", type=int, default=None, help="default: the model's generation config (official 3)")
    g.add_argument("--max-length", type=int, default=None, help="total length with the prompt (official 20)")
    g.add_argument("--min-length", type=int, default=None, help="total length with the prompt (official 5)")
    g.add_argument("--official-beam-scoring", action=argparse.BooleanOptionalAction, default=True,
                   help="the official transformers-4.12.5 beam search (--no-official-beam-scoring: transformers' own)")
    g.add_argument("--prompt", default=None, help="generation prompt (default: the processor's, official "
                   "'a picture of '; '' for none)")
    g.add_argument("--references", default=None, help="COCO caption ground truth (official coco_karpathy_test_gt.json) "
                   "instead of the rows' captions")
    g.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="constant-caption and nearest-neighbour baselines from --train-split")
    g.add_argument("--train-split", default="train", help="the training split the baselines draw from")
    g.add_argument("--baseline-train-images", type=int, default=None,
                   help="nearest-neighbour baseline: search the first N training images only")
    g.add_argument("--metrics-tokenizer", choices=["ptb", "simple"], default=None,
                   help="default: ptb (official) when Java is installed, else simple (and no METEOR)")
    return parser


def load_answer_list(dataset: str | None, path: str | None = None) -> list[str]:
    """The VQA candidate answers: a JSON list of strings at ``path``, else the dataset's answer list."""
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            answers = json.load(handle)
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path} must hold a JSON list of answer strings")
        return answers
    from ..data import load_vqa_answer_list

    return list(load_vqa_answer_list(dataset))


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
    print(f"wrote {path}")


def _main_vqa(args: argparse.Namespace, model: Any, processor: Any, dataset: Any, device: str) -> int:
    answer_list = load_answer_list(args.dataset, args.answer_list)
    metrics = evaluate_vqa(model, processor, dataset, answer_list, args.batch_size or 32, args.k_test,
                           args.max_examples, device=device, progress=args.progress)
    results = metrics.pop("results")
    if metrics["vqa_accuracy"] is not None:
        print(vqa_table(metrics))
    else:
        print(f"{metrics['num_examples']} questions answered (no annotations: submit the result file)")
    if args.output:
        _write_json(args.output, results)
    if args.metrics_output:
        _write_json(args.metrics_output, {"task": args.task, "model": args.model,
                                          "dataset": args.dataset or "synthetic", "split": args.split,
                                          "int8": args.int8, **metrics})
    return 0


def _main_captioning(args: argparse.Namespace, model: Any, processor: Any, dataset: Any, device: str) -> int:
    options = {k: v for k, v in (("num_beams", args.num_beams), ("max_length", args.max_length),
                                 ("min_length", args.min_length)) if v is not None}
    references = None
    if args.references:
        references = load_coco_caption_references(args.references)
    train_dataset = load_xvlm_dataset(args.dataset, "retrieval", args.train_split) if args.baselines else None
    metrics = evaluate_captioning(
        model, processor, dataset, args.batch_size or 32, args.max_examples, options, prompt=args.prompt,
        official_beam_scoring=args.official_beam_scoring, references=references, train_dataset=train_dataset,
        baseline_max_train_images=args.baseline_train_images, metrics_tokenizer=args.metrics_tokenizer,
        device=device, progress=args.progress,
    )
    results = metrics.pop("results")
    if "CIDEr" in metrics:
        print(captioning_table(metrics))
    else:
        print(f"{metrics['num_images']} images captioned (no references: submit the result file)")
    if args.output:
        _write_json(args.output, results)
    if args.metrics_output:
        _write_json(args.metrics_output, {"task": args.task, "model": args.model,
                                          "dataset": args.dataset or "synthetic", "split": args.split, "int8": args.int8,
                                          "generate_kwargs": options, **metrics})
    return 0


@cli_errors("xvlm-eval")
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xvlm-eval``; bad input is one line on stderr and exit status 2 (`modeling_xvlm.cli_errors`).
    The folders of ``--output`` / ``--metrics-output`` are checked for writing before anything is evaluated."""
    args = build_parser().parse_args(argv)
    require_model_source(args.model)
    for target in (args.output, getattr(args, "metrics_output", None)):
        if target:
            ensure_writable_dir(os.path.dirname(os.path.abspath(target)), "the --output folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.method != "box" and args.task != "grounding":
        raise ValueError(f"--method {args.method} is for the grounding task only")
    grounding_cls = XVLMForRetrieval if args.method == "gradcam" else XVLMForGrounding
    cls = {"retrieval": XVLMForRetrieval, "grounding": grounding_cls,
           "nlvr2": XVLMForImagesAndTextClassification, "vqa": XVLMForQuestionAnswering,
           "captioning": XVLMForConditionalGeneration}[args.task]
    if args.int8 and device != "cpu":
        raise ValueError(f"--int8 runs on the CPU only (--device {device}); pass --device cpu")
    model = cls.from_pretrained(args.model).to(device)
    if args.int8:
        model = quantize_int8(model, inplace=True)
    architectures = getattr(model.config, "architectures", None) or []
    if args.method == "gradcam" and architectures and "XVLMForRetrieval" not in architectures:
        raise ValueError(
            f"--method gradcam needs a retrieval checkpoint (XVLMForRetrieval, official Grounding.py); {args.model} "
            f"holds {architectures}"
        )
    processor = load_processor(args.model, args.tokenizer, model.config.image_size, model.config.patch_stride)
    config_name = "retrieval" if args.task == "captioning" else args.task  # captioning data are retrieval rows
    dataset = load_xvlm_dataset(args.dataset, config_name, args.split)
    if args.task == "vqa":
        return _main_vqa(args, model, processor, dataset, device)
    if args.task == "captioning":
        return _main_captioning(args, model, processor, dataset, device)
    batch_size = args.batch_size or (GRADCAM_BATCH_SIZE if args.method == "gradcam" else 64)
    if args.task == "retrieval":
        metrics = evaluate_retrieval(model, processor, dataset, args.k_test, batch_size, args.max_examples, device,
                                     precision=args.precision, encode_precision=args.encode_precision,
                                     progress=args.progress)
        print(retrieval_table(metrics))
    elif args.task == "nlvr2":
        metrics = evaluate_nlvr2(model, processor, dataset, batch_size, args.max_examples, device,
                                 progress=args.progress)
        print(nlvr2_table(metrics))
    else:
        metrics = evaluate_grounding(model, processor, dataset, batch_size, args.max_examples, device,
                                     method=args.method, gradcam_layer=args.gradcam_layer,
                                     real_tokens_only=args.real_tokens_only, progress=args.progress)
        print(grounding_table(metrics))
    metrics = {"task": args.task, "model": args.model, "dataset": args.dataset or "synthetic", "split": args.split,
               "int8": args.int8, **metrics}
    if args.output:
        _write_json(args.output, metrics)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
