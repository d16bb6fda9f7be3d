"""Benchmark 6: retrieval evaluation end to end on a synthetic gallery, official protocol vs the fast path.

Gallery: `n_images` random images at 384 px and `texts_per_image * n_images` random texts (text t describes image
t // texts_per_image, as COCO's five captions; 3 per image here to bound the official protocol's run time),
lengths drawn uniformly from [8, 24] tokens and padded to 40 as the official evaluation
(`padding='max_length', max_length=40`). Model: a *small* X-VLM (Swin 4 stages, width 192; text/fusion
width 192 with 3 heads of 64, 2 text + 2 fusion layers) with random weights and a fixed seed, so that the
official protocol runs in minutes on 2 CPU cores. A second case repeats the comparison once at X-VLM-base size
on a smaller gallery.

Each run is end to end: encode every image and text once, ITC similarities, top-k in both directions, ITM
re-ranking, the two official score matrices. Protocols:

- `official`: `modeling_xvlm.retrieval.official_protocol_scores`, the official loops (per image, then per text, k
  pairs each, the image repeated k times, no sharing, full fusion; scored by `itm_scores` as every protocol);
- `fast`: `rank_gallery` defaults, as `XVLMForRetrieval.rank` (each pair once, image keys/values once per image
  and layer, batches across images, text padding trimmed per batch, the last fusion layer on [CLS] only);
- `fast-no-trim`: the fast path without trimming the padding (an ablation);
- `fast+top1`: `fast`, then `refine_top1` (near ties re-scored in fp32; bf16 only).

Precisions: `fp32`; `bf16` (encoders and re-ranking under bf16 autocast); `bf16-rerank` (fp32 encoders, so the
ITC candidates are fp32's, and a bf16 re-ranking).

A third gallery is real: the tiny X-VLM trained for retrieval on the synthetic dataset (`xvlm-train retrieval`
recipe, 1,500 steps, about 100 s on 2 cores, cached in `benchmarks/.cache/`), evaluated on its test split (200
images, 600 captions). Random weights give near-equal ITM logits, where any rounding reorders candidates; the
trained model's scores are what a user's are, so its gallery is where bf16 is judged ("the same top-1").

Encoding is the same code in every protocol, so it is timed separately (per precision and attention, twice, the
median kept) and added to each re-ranking time for the end-to-end column.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from modeling_xvlm import XVLMConfig, retrieval

from .cases import SEED, Case, heads_available, make_pixels, make_text
from .harness import Variant, cosine_min, peak_mib, release_free_memory, reset_peak, rss_mib

SMALL_OVERRIDES: dict[str, Any] = {
    "vision_config": {"embed_dim": 24, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]},
    "text_config": {"hidden_size": 192, "num_hidden_layers": 4, "fusion_layer": 2, "num_attention_heads": 3,
                    "intermediate_size": 768},
    "projection_dim": 64,
}


def small_config(image_size: int = 384) -> XVLMConfig:
    return XVLMConfig.from_preset("base", image_size=image_size, **{k: dict(v) if isinstance(v, dict) else v
                                                                     for k, v in SMALL_OVERRIDES.items()})


def make_gallery(n_images: int, texts_per_image: int, image_size: int, vocab: int, max_length: int = 40):
    pixels = make_pixels(n_images, image_size, seed=SEED + 10)
    n_texts = n_images * texts_per_image
    ids, _ = make_text(n_texts, max_length, vocab, seed=SEED + 11)
    generator = torch.Generator().manual_seed(SEED + 12)
    lengths = torch.randint(8, 25, (n_texts,), generator=generator)
    mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    txt2img = torch.arange(n_texts) // texts_per_image
    img2txt = [list(range(i * texts_per_image, (i + 1) * texts_per_image)) for i in range(n_images)]
    return pixels, ids, mask, txt2img, img2txt


def encode(model, pixels, ids, mask, cpu: list | None = None):
    start, cpu_start = time.perf_counter(), time.process_time()
    images = retrieval.encode_images(model, pixels, batch_size=32)
    texts = retrieval.encode_texts(model, ids, mask, batch_size=128)
    if cpu is not None:
        cpu.append(time.process_time() - cpu_start)
    return images, texts, time.perf_counter() - start


def encode_precision(precision: str) -> str:
    """Precision of the encoders for a benchmark precision name (`bf16-rerank` encodes in fp32)."""
    return "fp32" if precision == "bf16-rerank" else precision


def rerank(model, protocol: str, precision: str, images, texts, k: int, batch_size: int,
           sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Re-ranking of an encoded gallery (under bf16 autocast unless `precision` is fp32): timings and the two
    official score matrices. `sources` (pixels, ids, mask) are re-encoded in fp32 by `fast+top1` on bf16
    encodings; on fp32 encodings (`bf16-rerank`) it reuses them."""
    start, cpu_start = time.perf_counter(), time.process_time()
    refined = None
    with Variant("sdpa", "fp32" if precision == "fp32" else "bf16").autocast():
        if protocol == "official":
            scores_i2t, scores_t2i = retrieval.official_protocol_scores(model, images, texts, k=k)
            pairs = None
        else:
            options = {"fast": {}, "fast+top1": {}, "fast-no-trim": {"trim_padding": False}}[protocol]
            output = retrieval.rank_gallery(model, images, texts, k=k, batch_size=batch_size, **options)
    if protocol != "official":
        if protocol == "fast+top1":
            if encode_precision(precision) == "fp32":
                output = retrieval.refine_top1(model, output, images, texts, batch_size=batch_size)
            else:
                pixels, ids, mask = sources
                output = retrieval.refine_top1(model, output, pixels, ids, mask, batch_size=batch_size)
            refined = output.num_pairs_refined
        scores_i2t, scores_t2i = retrieval.score_matrices(output)
        pairs = output.num_pairs_scored
    return {
        "rerank_s": time.perf_counter() - start,
        "rerank_cpu_s": time.process_time() - cpu_start,
        "scores_i2t": scores_i2t.float(),
        "scores_t2i": scores_t2i.float(),
        "image_features": images.features.float(),
        "text_features": texts.features.float(),
        "pairs_scored": pairs,
        "pairs_refined": refined,
    }


def run_protocol(model, protocol: str, precision: str, pixels, ids, mask, k: int, batch_size: int) -> dict[str, Any]:
    """One end-to-end evaluation (encode + re-rank)."""
    with Variant("sdpa", encode_precision(precision)).autocast():
        images, texts, encode_s = encode(model, pixels, ids, mask)
    out = rerank(model, protocol, precision, images, texts, k, batch_size, (pixels, ids, mask))
    out.update(encode_s=encode_s, total_s=encode_s + out["rerank_s"])
    return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def compare_runs(reference: dict[str, Any], other: dict[str, Any], k: int, txt2img, img2txt) -> dict[str, Any]:
    """Score-matrix and ranking agreement of `other` with `reference` (fp32 official)."""
    a_i2t, a_t2i = reference["scores_i2t"], reference["scores_t2i"]
    b_i2t, b_t2i = other["scores_i2t"], other["scores_t2i"]
    same_support = bool(torch.equal(a_i2t == -100, b_i2t == -100) and torch.equal(a_t2i == -100, b_t2i == -100))
    diff = max(float((a_i2t - b_i2t).abs().max()), float((a_t2i - b_t2i).abs().max()))
    common = [((a != -100) & (b != -100), a, b) for a, b in ((a_i2t, b_i2t), (a_t2i, b_t2i))]
    diff_common = max(float((a - b)[both].abs().max()) if bool(both.any()) else 0.0 for both, a, b in common)

    def valid_order(reference_scores: torch.Tensor, other_scores: torch.Tensor, n: int, tol: float) -> bool:
        """`other`'s top-n order is also a descending order of the reference scores, up to ties within `tol`."""
        order = other_scores.argsort(dim=1, descending=True, stable=True)[:, :n]
        ranked = reference_scores.gather(1, order)
        if not torch.equal(set_of(order), set_of(reference_scores.argsort(dim=1, descending=True, stable=True)[:, :n])):
            return False
        return bool((ranked[:, 1:] <= ranked[:, :-1] + tol).all())

    def set_of(indices: torch.Tensor) -> torch.Tensor:
        return indices.sort(dim=1).values

    def top(scores: torch.Tensor, n: int) -> torch.Tensor:
        return scores.argsort(dim=1, descending=True, stable=True)[:, :n]

    k_i2t, k_t2i = min(k, a_i2t.shape[1]), min(k, a_t2i.shape[1])
    rankings_equal = bool(
        torch.equal(top(a_i2t, k_i2t), top(b_i2t, k_i2t)) and torch.equal(top(a_t2i, k_t2i), top(b_t2i, k_t2i))
    )
    rankings_equal_up_to_ties = valid_order(a_i2t, b_i2t, k_i2t, 1e-5) and valid_order(a_t2i, b_t2i, k_t2i, 1e-5)
    top1 = torch.cat([top(a_i2t, 1) == top(b_i2t, 1), top(a_t2i, 1) == top(b_t2i, 1)]).float().mean()
    # where top-1 differs: how far below the reference's best is the other's pick, in the reference's own scores
    # (a near-tie when tiny compared with the spread of the re-ranked scores)
    gaps, unscored = [], 0
    for ref, oth in ((a_i2t, b_i2t), (a_t2i, b_t2i)):
        best_ref, best_oth = top(ref, 1)[:, 0], top(oth, 1)[:, 0]
        for row in (best_ref != best_oth).nonzero().flatten().tolist():
            picked = float(ref[row, best_oth[row]])
            if picked == -100:
                unscored += 1
            else:
                gaps.append(float(ref[row, best_ref[row]]) - picked)
    scored = torch.cat([a_i2t[a_i2t != -100], a_t2i[a_t2i != -100]])
    metrics_a = retrieval.retrieval_metrics(a_i2t, a_t2i, txt2img, img2txt)
    metrics_b = retrieval.retrieval_metrics(b_i2t, b_t2i, txt2img, img2txt)
    # top-1 flips whose query's candidate set differs from the reference's (the ITC top-k moved)
    other_candidates = 0
    for ref, oth in ((a_i2t, b_i2t), (a_t2i, b_t2i)):
        flipped = top(ref, 1)[:, 0] != top(oth, 1)[:, 0]
        moved = ((ref == -100) != (oth == -100)).any(dim=1)
        other_candidates += int((flipped & moved).sum())
    return {
        "same_candidates": same_support,
        "max_abs_score_diff": diff,
        "max_abs_score_diff_common_candidates": diff_common,
        "rankings_identical": rankings_equal,
        "rankings_identical_up_to_ties_1e-5": rankings_equal_up_to_ties,
        "top1_agreement": float(top1),
        "top1_flips": len(gaps) + unscored,
        "top1_flips_outside_reference_candidates": unscored,
        "top1_flip_max_reference_gap": max(gaps) if gaps else 0.0,
        "top1_flips_with_other_candidates": other_candidates,
        "reference_score_std": float(scored.std()),
        "metrics_identical": metrics_a == metrics_b,
        "r_mean": metrics_b["r_mean"],
        "r_mean_reference": metrics_a["r_mean"],
        "r1": [metrics_b["txt_r1"], metrics_b["img_r1"]],
        "r1_reference": [metrics_a["txt_r1"], metrics_a["img_r1"]],
        "itc_image_cosine_min": cosine_min(reference["image_features"], other["image_features"]),
        "itc_text_cosine_min": cosine_min(reference["text_features"], other["text_features"]),
    }


class RetrievalEvalCase(Case):
    """Benchmark 6. Variants are (protocol, precision, attention) at each k; timings are interleaved over rounds."""

    unit = "galleries"
    needs = "XVLMForRetrieval"

    def __init__(self, n_images: int, texts_per_image: int, ks: tuple[int, ...], size: str, quick: bool = False,
                 repeats: int | None = None, variants: list[tuple[str, str, str]] | None = None,
                 batch_size: int = 64, encode_rounds: int = 2):
        super().__init__(quick)
        self.n_images, self.texts_per_image, self.ks, self.size = n_images, texts_per_image, ks, size
        self.repeats, self.batch_size, self.encode_rounds = repeats, batch_size, encode_rounds
        self.number = "6"
        self.key = f"retrieval_eval_{size}_{n_images}x{n_images * texts_per_image}_k{'-'.join(map(str, ks))}"
        model_name = {"small": "small X-VLM", "base": "X-VLM-base", "tiny": "tiny X-VLM"}[size]
        self.title = (
            f"retrieval evaluation end to end, {model_name} @ 384, {n_images} images x "
            f"{n_images * texts_per_image} texts, k = {', '.join(map(str, ks))}"
        )
        self.items = 1
        self._variants = variants

    def unavailable_reason(self) -> str | None:
        reason = super().unavailable_reason()
        if reason:
            return reason
        return None

    def build(self) -> None:
        import modeling_xvlm

        torch.manual_seed(SEED)
        if self.quick or self.size == "tiny":
            config = XVLMConfig.from_preset("tiny")
        elif self.size == "small":
            config = small_config(384)
        else:
            config = XVLMConfig.from_preset("base", image_size=384)
        self.config = config
        self.model = modeling_xvlm.XVLMForRetrieval(config).eval()
        self.gallery = make_gallery(
            self.n_images, self.texts_per_image, config.image_size, config.text_config.vocab_size
        )

    def run_plan(self) -> list[tuple[str, str, str, int, int]]:
        """(protocol, precision, attention, k, repeats) of every re-ranking run."""
        if self._variants is not None:
            return [(p, prec, a, k, self.repeats or 1) for k in self.ks for (p, prec, a) in self._variants]
        if os.environ.get("XVLM_BENCH_LEAN"):  # `--lean`: one run of each protocol, sdpa only
            return [(p, prec, "sdpa", k, 1) for k in self.ks for (p, prec) in (
                ("official", "fp32"), ("fast", "fp32"), ("fast", "bf16"),
                ("fast+top1", "bf16"), ("fast+top1", "bf16-rerank"),
                *((("fast-no-trim", "fp32"),) if k <= 16 else ()))]
        plan = []
        for k in self.ks:
            small_k = k <= 16
            plan += [
                ("official", "fp32", "sdpa", k, 1),  # minutes per run: one run
                ("fast", "fp32", "sdpa", k, 2 if small_k else 1),
                ("fast", "bf16", "sdpa", k, 2 if small_k else 1),
                ("fast+top1", "bf16", "sdpa", k, 1),
                ("fast+top1", "bf16-rerank", "sdpa", k, 1),
            ]
            if small_k:
                plan += [
                    ("fast-no-trim", "fp32", "sdpa", k, 1),
                    ("official", "fp32", "eager", k, 1),
                    ("fast", "fp32", "eager", k, 1),
                ]
        if self.quick:
            plan = [(p, prec, a, k, min(r, 2)) for (p, prec, a, k, r) in plan]
        return plan

    def measure(self, warmup: int, repeats: int, log) -> dict[str, Any]:
        pixels, ids, mask, txt2img, img2txt = self.gallery
        plan = self.run_plan()
        # 1. encoding: the same code in every protocol; timed per (precision, attention), results reused
        encodings: dict[tuple[str, str], Any] = {}
        encode_times: dict[tuple[str, str], list[float]] = {}
        encode_peaks: dict[tuple[str, str], float] = {}
        encode_cpu: dict[tuple[str, str], list[float]] = {}
        combos = sorted({(encode_precision(prec), attn) for (_, prec, attn, _, _) in plan})
        rounds = 1 if os.environ.get("XVLM_BENCH_LEAN") else self.encode_rounds
        for round_index in range(rounds):
            for precision, attn in combos:
                self.set_attn(attn)
                release_free_memory()
                before = rss_mib()
                reset_peak()
                with torch.no_grad(), Variant(attn, precision).autocast():
                    images, texts, seconds = encode(
                        self.model, pixels, ids, mask, encode_cpu.setdefault((precision, attn), []))
                peak = peak_mib()
                if before is not None and peak is not None:
                    encode_peaks[(precision, attn)] = max(encode_peaks.get((precision, attn), 0.0), peak - before)
                encodings.setdefault((precision, attn), (images, texts))
                encode_times.setdefault((precision, attn), []).append(seconds)
                log(f"    encode {precision}/{attn}: {seconds:.2f}s")
        encode_s = {combo: _median(v) for combo, v in encode_times.items()}
        # 2. re-ranking, rounds interleaved across the runs of each k
        results: dict[str, Any] = {
            "encode": {f"{p}/{a}": {"median_s": encode_s[(p, a)], "times_s": encode_times[(p, a)],
                                     "cpu_median_s": _median(encode_cpu[(p, a)]),
                                     "peak_extra_mib": encode_peaks.get((p, a))} for (p, a) in combos},
        }
        for k in self.ks:
            runs = [r for r in plan if r[3] == k]
            times: dict[str, list[float]] = {}
            cpu_times: dict[str, list[float]] = {}
            peaks: dict[str, float] = {}
            first: dict[str, dict[str, Any]] = {}
            shuffler = random.Random(k)
            for round_index in range(max(r[4] for r in runs)):
                if round_index:  # the order within a round changes from round to round (as measure_interleaved)
                    runs = shuffler.sample(runs, len(runs))
                for protocol, precision, attn, _, count in runs:
                    if round_index >= count:
                        continue
                    name = f"{protocol}/{precision}/{attn}"
                    self.set_attn(attn)
                    images, texts = encodings[(encode_precision(precision), attn)]
                    release_free_memory()
                    before = rss_mib()
                    reset_peak()
                    with torch.no_grad():
                        out = rerank(self.model, protocol, precision, images, texts, k, self.batch_size,
                                     (pixels, ids, mask))
                    peak = peak_mib()
                    if before is not None and peak is not None:
                        peaks[name] = max(peaks.get(name, 0.0), peak - before)
                    times.setdefault(name, []).append(out["rerank_s"])
                    cpu_times.setdefault(name, []).append(out["rerank_cpu_s"])
                    first.setdefault(name, out)
                    log(f"    k={k} round {round_index + 1} {name}: re-rank {out['rerank_s']:.2f}s")
            reference = first.get("official/fp32/sdpa") or next(iter(first.values()))
            per_k: dict[str, Any] = {}
            for name, values in times.items():
                protocol, precision, attn = name.split("/")
                encoded_as = (encode_precision(precision), attn)
                values = sorted(values)
                median = values[len(values) // 2] if len(values) % 2 else (
                    values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
                row = {
                    "variant": {"protocol": protocol, "precision": precision, "attn": attn},
                    "encode_s": encode_s[encoded_as],
                    "rerank_s": median,
                    "rerank_min_s": values[0],
                    "rerank_max_s": values[-1],
                    "rerank_times_s": times[name],
                    "rerank_cpu_s": _median(cpu_times[name]),
                    "rerank_cpu_times_s": cpu_times[name],
                    "total_cpu_s": _median(encode_cpu[encoded_as]) + _median(cpu_times[name]),
                    "total_s": encode_s[encoded_as] + median,
                    "runs": len(values),
                    "peak_extra_mib": peaks.get(name),
                    "pairs_scored": first[name]["pairs_scored"],
                    "pairs_refined": first[name]["pairs_refined"],
                    "agreement_vs_official_fp32_sdpa": compare_runs(reference, first[name], k, txt2img, img2txt),
                }
                same_official = f"official/{precision}/{attn}"
                if protocol != "official" and same_official in first:
                    row["agreement_vs_official_same_precision"] = compare_runs(
                        first[same_official], first[name], k, txt2img, img2txt)
                per_k[name] = row
            n_texts = ids.shape[0]
            per_k["_official_pairs"] = self.n_images * min(k, n_texts) + n_texts * min(k, self.n_images)
            results[f"k={k}"] = per_k
        return results

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({"n_images": self.n_images, "n_texts": self.n_images * self.texts_per_image,
                    "ks": list(self.ks), "model": self.size, "batch_size": self.batch_size})
        return out

    def compile_variants(self) -> list[Variant]:
        return []


CACHE = Path(__file__).resolve().parent / ".cache"

#: Trained galleries: model size overrides of the tiny preset (64 px, the synthetic dataset), steps, learning rate.
#: "tiny" is the demo job's model (width 32: too small for bf16 to pay on a CPU); "wide" widens the text and
#: fusion layers to 192 (3 heads of 64, 2 + 2 layers), where bf16 matmuls are faster than fp32 ones.
TRAINED_GALLERIES: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 1500, "lr": 1e-3, "overrides": None, "description": "demo size (width 32)"},
    "wide": {
        "steps": 1000,
        "lr": 1e-3,
        "overrides": {
            "vision_config": {"embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4,
                              "use_absolute_embeddings": True},
            "text_config": {"hidden_size": 192, "num_hidden_layers": 4, "fusion_layer": 2, "num_attention_heads": 3,
                            "intermediate_size": 768, "hidden_dropout_prob": 0.0,
                            "attention_probs_dropout_prob": 0.0},
            "projection_dim": 64,
        },
        "description": "text/fusion width 192, 2 + 2 layers, Swin 2 stages of width 32/64",
    },
}


def trained_gallery_model(size: str = "tiny", log=print, task: str = "retrieval") -> tuple[str, dict[str, Any]]:
    """An X-VLM trained for `task` (retrieval, grounding) on the synthetic dataset from scratch (trained once, then
    cached in `benchmarks/.cache/`): the model folder and its training summary."""
    from modeling_xvlm.training.main_job import DEMO_SIZES
    from modeling_xvlm.training.train import TrainConfig, train

    spec = TRAINED_GALLERIES[size]
    overrides = spec["overrides"] or DEMO_SIZES["tiny"]
    folder = CACHE / f"{task}-{size}-synthetic-{spec['steps']}"
    summary_file = folder / "benchmark_training.json"
    if summary_file.exists():
        return str(folder), json.loads(summary_file.read_text())
    log(f"    training the {size} {task} model ({spec['steps']} steps, cached in {folder})")
    start = time.perf_counter()
    result = train(TrainConfig(
        task=task, model="tiny", config_overrides=json.loads(json.dumps(overrides)),
        tokenizer="synthetic", image_size=64, output_dir=str(folder), max_steps=spec["steps"], batch_size=64,
        lr=spec["lr"], warmup=0.05, randaugment=False, crop_scale_min=1.0, seed=0, eval_at_end=False, cpu=True,
        mixed_precision="no", progress=False, log_every=500, save_total_limit=1,
        grounding_crop=False,  # as the demo at 64 px (no effect on retrieval)
    ))
    summary = {"steps": spec["steps"], "train_s": time.perf_counter() - start, "last_losses": result["last_losses"],
               "recipe": f"xvlm-train {task}, tiny preset overridden to: {spec['description']}; synthetic "
                         f"tokenizer, 64 px, {spec['steps']} steps of 64, lr {spec['lr']:g}, seed 0, from scratch"}
    summary_file.write_text(json.dumps(summary, indent=1, default=str))
    return str(folder), summary


def synthetic_test_gallery(folder: str):
    """The synthetic retrieval test split through the processor of `folder` (evaluation transform, texts padded to
    40 as the official evaluation): `(pixel_values, input_ids, attention_mask, txt2img, img2txt)`."""
    from modeling_xvlm.data import load_xvlm_dataset
    from modeling_xvlm.processing import XVLMProcessor, load_image_rgb

    processor = XVLMProcessor.from_pretrained(folder)
    rows = list(load_xvlm_dataset(None, "retrieval", "test"))
    texts, txt2img, img2txt = [], [], []
    for index, row in enumerate(rows):
        img2txt.append(list(range(len(texts), len(texts) + len(row["captions"]))))
        texts += row["captions"]
        txt2img += [index] * len(row["captions"])
    pixels = processor.image_processor([load_image_rgb(r["image"]) for r in rows], return_tensors="pt")
    encoded = processor(text=texts, padding="max_length", max_length=40)
    return (pixels["pixel_values"], encoded["input_ids"], encoded["attention_mask"], torch.tensor(txt2img), img2txt)


class TrainedRetrievalEvalCase(RetrievalEvalCase):
    """Benchmark 6 on a trained model fine-tuned on the synthetic dataset, on its test split."""

    def __init__(self, size: str = "tiny", ks: tuple[int, ...] = (16, 64), quick: bool = False):
        super().__init__(200, 3, ks, "tiny", quick=quick, repeats=3, variants=[
            ("official", "fp32", "sdpa"), ("fast", "fp32", "sdpa"), ("fast", "bf16", "sdpa"),
            ("fast+top1", "bf16", "sdpa"), ("fast+top1", "bf16-rerank", "sdpa"),
        ])
        self.trained_size = size
        self.key = f"retrieval_eval_trained_{size}_test_k{'-'.join(map(str, ks))}"
        self.title = (
            f"retrieval evaluation end to end, X-VLM trained on the synthetic dataset ({size}: "
            f"{TRAINED_GALLERIES[size]['description']}, 64 px), its test split: 200 images x 600 captions, "
            f"k = {', '.join(map(str, ks))}"
        )

    def build(self) -> None:
        import modeling_xvlm

        folder, self.training = trained_gallery_model(self.trained_size)
        self.model = modeling_xvlm.XVLMForRetrieval.from_pretrained(folder).eval()
        self.config = self.model.config
        self.gallery = synthetic_test_gallery(folder)
        self.n_images, self.texts_per_image = len(self.gallery[4]), self.gallery[1].shape[0] / len(self.gallery[4])

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({"n_texts": 600, "model": f"{self.trained_size}, trained",
                    "training": getattr(self, "training", None)})
        return out


def retrieval_cases(quick: bool = False) -> list[RetrievalEvalCase]:
    if quick:
        return [RetrievalEvalCase(12, 5, (4, 16), "tiny", quick=True, repeats=2)]
    return [
        RetrievalEvalCase(100, 3, (16,), "small"),
        RetrievalEvalCase(100, 3, (64,), "small", encode_rounds=1),
        RetrievalEvalCase(
            16, 5, (16,), "base", repeats=1,
            variants=[("official", "fp32", "sdpa"), ("fast", "fp32", "sdpa"), ("fast", "bf16", "sdpa"),
                      ("fast+top1", "bf16-rerank", "sdpa")],
        ),
        TrainedRetrievalEvalCase("tiny"),
        TrainedRetrievalEvalCase("wide"),
    ]


def worker_retrieval(case: RetrievalEvalCase, warmup: int, repeats: int, log) -> dict[str, Any]:
    if not heads_available("XVLMForRetrieval"):
        return {"case": case.describe(), "skipped": "XVLMForRetrieval is not available"}
    start = time.perf_counter()
    case.build()
    build_s = time.perf_counter() - start
    # warm-up: one tiny evaluation per precision/attention (first-call costs of the kernels)
    pixels, ids, mask, _, _ = case.gallery
    for precision in ("fp32", "bf16", "bf16-rerank"):
        for attn in ("sdpa", "eager"):
            case.set_attn(attn)
            with torch.no_grad():
                for protocol in ("fast", "official", "fast+top1"):
                    if protocol == "fast+top1" and precision == "fp32":
                        continue
                    run_protocol(case.model, protocol, precision, pixels[:4], ids[:8], mask[:8], 2, case.batch_size)
    return {"case": case.describe(), "build_s": build_s, "retrieval": case.measure(warmup, repeats, log)}
