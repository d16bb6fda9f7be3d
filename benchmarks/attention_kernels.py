"""Attention kernels on X-VLM-base shapes: one attention call with the eager matmuls, with torch's
`scaled_dot_product_attention` (transformers' `sdpa_attention_forward`) and with X-VLM's `"sdpa"`
(`modeling_xvlm.attention.sdpa_where_it_pays_forward`, which picks one of the two per call).

Inference: forward only, no autograd. Training: forward + backward with gradients for queries, keys and values;
the text and fusion calls use BERT's attention dropout (0.1; one row without, as in dropout-free fine-tuning), the
Swin calls a relative-position bias that needs a gradient (as in training) and no dropout. These numbers are the basis of the kernel choice documented in
`sdpa_where_it_pays_forward` and docs/benchmarks.md.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .cases import SEED, Case

#: (name, rows, heads, query tokens, key tokens, head dim, kind); rows = batch x windows for Swin.
SHAPES: list[tuple[str, int, int, int, int, int, str]] = [
    ("Swin stage 1 @ 224, batch 8 (512 windows of 7x7)", 512, 4, 49, 49, 32, "swin"),
    ("Swin stage 3 @ 224, batch 8 (32 windows of 7x7)", 32, 16, 49, 49, 32, "swin"),
    ("Swin stage 1 @ 384, batch 4 (256 windows of 12x12)", 256, 4, 144, 144, 32, "swin"),
    ("Swin stage 3 @ 384, batch 4 (16 windows of 12x12)", 16, 16, 144, 144, 32, "swin"),
    ("text self-attention, 32 x 30 tokens", 32, 12, 30, 30, 64, "text"),
    ("text self-attention, 32 x 30 tokens, no dropout", 32, 12, 30, 30, 64, "text-nodrop"),
    ("fusion cross-attention, 32 pairs, 30 x 50 image tokens (224)", 32, 12, 30, 50, 64, "cross"),
    ("fusion cross-attention, 32 pairs, 30 x 145 image tokens (384)", 32, 12, 30, 145, 64, "cross"),
]


class _Module(nn.Module):
    is_causal = False


def _inputs(rows: int, heads: int, lq: int, lk: int, dim: int, kind: str, training: bool, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(SEED)
    q = torch.randn(rows, heads, lq, dim, generator=generator, dtype=dtype, requires_grad=training)
    k = torch.randn(rows, heads, lk, dim, generator=generator, dtype=dtype, requires_grad=training)
    v = torch.randn(rows, heads, lk, dim, generator=generator, dtype=dtype, requires_grad=training)
    if kind == "swin":  # relative-position bias (a parameter in training)
        mask = torch.randn(1, heads, lq, lk, generator=generator, dtype=dtype, requires_grad=training)
    else:  # key padding mask of 0 / large negative
        keep = torch.rand(rows, 1, 1, lk, generator=generator) > 0.2
        keep[..., 0] = True
        mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    dropout = 0.1 if training and kind in ("text", "cross") else 0.0
    return q, k, v, mask, dropout


def _time_call(function, module, inputs, training: bool, warmup: int, repeats: int) -> tuple[float, str | None]:
    q, k, v, mask, dropout = inputs
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        with torch.set_grad_enabled(training):
            output, _ = function(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5, dropout=dropout)
            if training:
                output.float().sum().backward()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], None


class AttentionKernelsCase(Case):
    key = "attention_kernels"
    number = "A"
    title = "attention kernels, one call on X-VLM-base shapes: eager vs torch SDPA vs X-VLM's sdpa"

    def worker(self, warmup: int, repeats: int, log) -> dict[str, Any]:
        import modeling_xvlm.attention as modeling
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        picked: list[str] = []

        def recording(name, function):
            def call(*args, **kwargs):
                picked.append(name)
                return function(*args, **kwargs)

            return call

        rows_out = []
        repeats = max(repeats * 4, 10)
        for name, rows, heads, lq, lk, dim, kind in SHAPES[: 2 if self.quick else None]:
            for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                for mode in ("inference", "training"):
                    training = mode == "training"
                    module = _Module().train(training)
                    inputs = _inputs(rows, heads, lq, lk, dim, kind, training, dtype)
                    eager, _ = _time_call(modeling.eager_attention_forward, module, inputs, training, 2, repeats)
                    sdpa, _ = _time_call(sdpa_attention_forward, module, inputs, training, 2, repeats)
                    # which kernel X-VLM's "sdpa" picks for this call (the dispatch is a pure function of it)
                    originals = modeling.eager_attention_forward, modeling.sdpa_attention_forward
                    modeling.eager_attention_forward = recording("eager", originals[0])
                    modeling.sdpa_attention_forward = recording("torch SDPA", originals[1])
                    try:
                        picked.clear()
                        _time_call(modeling.sdpa_where_it_pays_forward, module, inputs, training, 0, 1)
                    finally:
                        modeling.eager_attention_forward, modeling.sdpa_attention_forward = originals
                    row = {"shape": name, "precision": precision, "mode": mode, "eager_ms": eager * 1e3,
                           "torch_sdpa_ms": sdpa * 1e3, "xvlm_sdpa_picks": picked[0] if picked else "n/a"}
                    rows_out.append(row)
                    log(f"    {name} {precision} {mode}: eager {eager * 1e3:.2f} ms, torch SDPA {sdpa * 1e3:.2f} ms, "
                        f"X-VLM sdpa -> {row['xvlm_sdpa_picks']}")
        return {"case": self.describe(), "kernels": rows_out, "torch_threads": torch.get_num_threads(),
                "calls_per_median": repeats}

    def compile_variants(self) -> list:
        return []
