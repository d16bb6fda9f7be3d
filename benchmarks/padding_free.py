"""Benchmark 10: padding-free text and fusion layers (`text_config.padding_free`, the default) against the padded
computation (`padding_free=False`: every position, as the official `xbert.py`), at X-VLM-base size.

Random weights (fixed seed), fp32, sdpa, both variants timed interleaved in one process. Workloads:

- `text_b32_l30`: the text encoder + ITC projection, 32 texts of 15-30 tokens padded to 30 (benchmark 2);
- `text_b32_l40`: the same, 8-24 tokens padded to 40 (the official retrieval evaluation pads to 40);
- `fusion_32p`: the 6 fusion layers on 32 pairs of 15-30 tokens at 224 px (benchmark 3);
- `itm_32p_l40`: ITM "match" scores of 32 pairs (8-24 tokens of 40; the last layer computes [CLS] only: the
  re-ranking step of retrieval evaluation);
- `train_retrieval_224_b4`: a retrieval training step, ITC + ITM, forward + backward (benchmark 4).

Agreement: the outputs of both variants (features, [CLS] states, scores, the loss) must match to fp32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from .cases import SEED, Case, TrainRetrievalCase, make_pixels, make_text
from .harness import Variant, max_abs, measure_interleaved

VARIANTS = ("padded", "padding-free")


def set_padding_free(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every text stack of `model` (their configs) between the two computations."""
    from modeling_xvlm.modeling_xvlm_text import XVLMTextModel

    for module in model.modules():
        if isinstance(module, XVLMTextModel):
            module.config.padding_free = enabled


def _inference_workloads(quick: bool) -> dict[str, tuple[torch.nn.Module, Any, torch.Tensor]]:
    """`{workload: (model, call, its texts' attention mask)}` at base size (tiny with `quick`)."""
    import modeling_xvlm
    from modeling_xvlm.retrieval import itm_scores

    torch.manual_seed(SEED)
    config = modeling_xvlm.XVLMConfig.from_preset("tiny" if quick else "base")
    model = modeling_xvlm.XVLMForRetrieval(config).eval()
    model.set_attn_implementation("sdpa")
    vocab = config.text_config.vocab_size
    ids30, mask30 = make_text(32, 30, vocab, min_length=15)
    ids40, mask40 = (torch.nn.functional.pad(t, (0, 16)) for t in make_text(32, 24, vocab, 8, seed=SEED + 2))
    with torch.no_grad():
        images = model.xvlm.encode_image(make_pixels(32, config.image_size)).last_hidden_state
        states30 = model.xvlm.encode_text(ids30, mask30).last_hidden_state
        states40 = model.xvlm.encode_text(ids40, mask40).last_hidden_state
    text_model = model.xvlm.text_model
    return {
        "text_b32_l30": (model, lambda: model.get_text_features(ids30, mask30).pooler_output, mask30),
        "text_b32_l40": (model, lambda: model.get_text_features(ids40, mask40).pooler_output, mask40),
        "fusion_32p": (model, lambda: text_model.fuse(states30, mask30, images).last_hidden_state[:, 0], mask30),
        "itm_32p_l40": (model, lambda: itm_scores(model, images, states40, mask40), mask40),
    }


def _switched(model: torch.nn.Module, enabled: bool, call: Any) -> Any:
    def run() -> Any:
        set_padding_free(model, enabled)
        return call()

    return run


class PaddingFreeCase(Case):
    number = "10"
    unit = "items"
    key = "padding_free"
    title = "padding-free text and fusion layers against the padded computation (base size, fp32, sdpa)"
    items = 32

    def worker(self, warmup: int, repeats: int, log) -> dict[str, Any]:
        calls, agreement, real_fraction = {}, {}, {}
        for name, (model, call, mask) in _inference_workloads(self.quick).items():
            outputs = {}
            for variant in VARIANTS:
                calls[f"{name}/{variant}"] = torch.no_grad()(_switched(model, variant == "padding-free", call))
                outputs[variant] = calls[f"{name}/{variant}"]()
            agreement[name] = {"max_abs_diff": max_abs(outputs["padded"], outputs["padding-free"]),
                               "reference_max_abs": float(outputs["padded"].abs().max())}
            real_fraction[name] = float(mask.float().mean())
        training = TrainRetrievalCase(4, 224, quick=self.quick)
        training.build()
        step = training.callable_for(Variant("sdpa", "fp32"))
        losses = {}
        training.model.eval()  # the loss compared without dropout, whose masks differ between the layouts
        for variant in VARIANTS:
            calls[f"train_retrieval_224_b4/{variant}"] = _switched(training.model, variant == "padding-free", step)
            losses[variant] = calls[f"train_retrieval_224_b4/{variant}"]()
        training.model.train()
        agreement["train_retrieval_224_b4"] = training.compare(losses["padded"], losses["padding-free"])
        real_fraction["train_retrieval_224_b4"] = float(training.mask.float().mean())
        log(f"    agreement {agreement}")
        timings = measure_interleaved(calls, max(0, warmup - 1), repeats, log)
        results = {name: {"variant": {"name": name, "attn": "sdpa", "precision": "fp32"},
                          **timings[name].summary(self.items if "train" not in name else 4)} for name in calls}
        return {"case": self.describe(), "results": results, "agreement": agreement,
                "real_token_fraction": real_fraction, "torch_threads": torch.get_num_threads()}

    def compile_variants(self) -> list:
        return []


def padding_free_cases(quick: bool = False) -> list[Case]:
    return [PaddingFreeCase(quick=quick)]
