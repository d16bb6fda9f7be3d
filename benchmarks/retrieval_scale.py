"""Benchmark 9: retrieval evaluation time and memory against gallery size, and the projection to COCO 5k.

The fast path (`encode_images`, `encode_texts`, `rank_gallery`: ITC top-k both ways, ITM re-ranking of the union of
candidate pairs), fp32, sdpa, one run per size (they are long), on the benchmark-6 small model (random weights,
384 px) with galleries of `n` random images and 5 random texts per image (COCO's ratio), k 16. Per size: wall and CPU
time of each stage, pairs scored, the resident size of the encoded gallery and the peak extra memory of the
re-ranking (`VmHWM` reset before it).

Costs are fitted by least squares through the origin: image encoding seconds per image, text encoding seconds per
text, re-ranking seconds per scored pair. The same three costs are measured once at X-VLM-base size on a small
gallery, and projected to COCO 5k images / 25k texts at the official k 256, where the pairs scored are at most
5,000 x 256 + 25,000 x 256 (the union of both directions' candidates; fewer where they overlap).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from modeling_xvlm import XVLMConfig, XVLMForRetrieval, retrieval

from .cases import SEED, Case
from .harness import peak_mib, release_free_memory, reset_peak, rss_mib
from .retrieval_eval import make_gallery, small_config

TEXTS_PER_IMAGE = 5
COCO = {"n_images": 5000, "n_texts": 25000, "k": 256}


def _measure(model: Any, n_images: int, k: int, image_size: int) -> dict[str, Any]:
    """Encode and rank a gallery of `n_images` x `TEXTS_PER_IMAGE`: times, pairs, memory."""
    pixels, ids, mask, _, _ = make_gallery(n_images, TEXTS_PER_IMAGE, image_size, model.config.text_config.vocab_size)
    release_free_memory()
    before = rss_mib()
    stages: dict[str, Any] = {}
    with torch.no_grad():
        start, cpu = time.perf_counter(), time.process_time()
        images = retrieval.encode_images(model, pixels, batch_size=32)
        stages["images_s"], stages["images_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        texts = retrieval.encode_texts(model, ids, mask, batch_size=128)
        stages["texts_s"], stages["texts_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        gallery_mib = None if before is None else rss_mib() - before
        release_free_memory()
        resident = rss_mib()
        reset_peak()
        start, cpu = time.perf_counter(), time.process_time()
        output = retrieval.rank_gallery(model, images, texts, k=k, batch_size=64)
        stages["rerank_s"], stages["rerank_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        peak = peak_mib()
    return {
        "n_images": n_images, "n_texts": n_images * TEXTS_PER_IMAGE, "k": k, "pairs": output.num_pairs_scored,
        **stages, "total_s": stages["images_s"] + stages["texts_s"] + stages["rerank_s"],
        "encoded_gallery_mib": gallery_mib,
        "rerank_peak_extra_mib": None if peak is None or resident is None else peak - resident,
    }


def _fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per image, per text and per scored pair (least squares through the origin, one cost per stage)."""
    def per(stage: str, unit: str) -> float:
        x = torch.tensor([float(r[unit]) for r in rows], dtype=torch.float64)
        y = torch.tensor([r[stage] for r in rows], dtype=torch.float64)
        return float((x * y).sum() / (x * x).sum())

    return {"s_per_image": per("images_s", "n_images"), "s_per_text": per("texts_s", "n_texts"),
            "s_per_pair": per("rerank_s", "pairs")}


def coco_projection(costs: dict[str, float]) -> dict[str, float]:
    """Seconds for COCO 5k images / 25k texts at k 256 from fitted costs (pairs: the upper bound, no overlap)."""
    pairs = COCO["n_images"] * COCO["k"] + COCO["n_texts"] * COCO["k"]
    parts = {"images_s": costs["s_per_image"] * COCO["n_images"], "texts_s": costs["s_per_text"] * COCO["n_texts"],
             "rerank_s": costs["s_per_pair"] * pairs}
    return {**parts, "pairs_upper_bound": pairs, "total_s": sum(parts.values())}


class RetrievalScaleCase(Case):
    number = "9"
    key = "retrieval_scale"
    title = "retrieval evaluation time and memory against gallery size (fast path, fp32, k 16), COCO projection"
    unit = "images"

    def __init__(self, quick: bool = False):
        super().__init__(quick)
        self.sizes = (4, 8) if quick else (50, 100, 200, 400, 800)

    def worker(self, warmup: int, repeats: int, log) -> dict[str, Any]:
        torch.manual_seed(SEED)
        config = XVLMConfig.from_preset("tiny") if self.quick else small_config(384)
        model = XVLMForRetrieval(config).eval()
        model.set_attn_implementation("sdpa")
        _measure(model, self.sizes[0], 16, config.image_size)  # warm-up
        rows = []
        for n in self.sizes:
            rows.append(_measure(model, n, 16, config.image_size))
            log(f"    {rows[-1]}")
        torch.manual_seed(SEED)
        base_config = XVLMConfig.from_preset("tiny") if self.quick else XVLMConfig.from_preset("base", image_size=384)
        base = XVLMForRetrieval(base_config).eval()
        base.set_attn_implementation("sdpa")
        _measure(base, 4, 16, base_config.image_size)  # warm-up
        base_rows = [_measure(base, 16, 16, base_config.image_size)]
        log(f"    base {base_rows[0]}")
        small_costs, base_costs = _fit(rows), _fit(base_rows)
        return {
            "case": self.describe(), "results": {}, "rows": rows, "fit": small_costs,
            "base": {"rows": base_rows, "fit": base_costs, "coco": coco_projection(base_costs)},
            "torch_threads": torch.get_num_threads(),
        }

    def compile_variants(self) -> list:
        return []


def retrieval_scale_cases(quick: bool = False) -> list[Case]:
    return [RetrievalScaleCase(quick=quick)]
