"""Benchmark 8: int8 dynamic quantization for CPU inference (`modeling_xvlm.quantize_int8`) against fp32.

Speed, at X-VLM-base size with random weights (fixed seed, sdpa), fp32 and int8 timed interleaved in one process:

- `text`: the text encoder and its ITC projection, 32 texts of 8-30 tokens (`get_text_features`);
- `fusion`: ITM "match" logits of 32 (image, text) pairs through the fusion layers, image sequences given;
- `decoder`: one teacher-forced pass of the VQA answer decoder, 32 answers of 6 tokens over 32 question states.

Output agreement of each workload: the largest absolute difference (next to the largest fp32 value) and, for
features and logits, the smallest per-row cosine. Agreement, on trained tiny models (cached in `benchmarks/.cache/`, the recipe in the results), on the synthetic
test split:

- retrieval (`XVLMForRetrieval.rank`, k 16): how often each text's top-1 image and each image's top-1 text stay the
  fp32 ones, and R@1 of both;
- grounding (`XVLMForGrounding`, 498 test expressions): how often the int8 box has IoU >= 0.9 with the fp32 box, and
  Acc@0.5 of both.
"""

from __future__ import annotations

from typing import Any

import torch

from .cases import CLS_ID, SEED, Case, make_pixels, make_text
from .harness import cosine_min, measure_interleaved

VARIANTS = ("fp32", "int8")


def _speed_workloads(quick: bool) -> dict[str, tuple[Any, Any]]:
    """`{workload: (fp32 call, int8 call)}` at base size (tiny with `quick`)."""
    import modeling_xvlm
    from modeling_xvlm.retrieval import itm_scores

    torch.manual_seed(SEED)
    config = modeling_xvlm.XVLMConfig.from_preset("tiny" if quick else "base",
                                                  text_config={"bos_token_id": CLS_ID, "eos_token_id": 102})
    vocab, hidden = config.text_config.vocab_size, config.text_config.hidden_size
    retrieval = modeling_xvlm.XVLMForRetrieval(config).eval()
    vqa = modeling_xvlm.XVLMForQuestionAnswering(config).eval()
    for model in (retrieval, vqa):
        model.set_attn_implementation("sdpa")
    models = {"fp32": (retrieval, vqa), "int8": tuple(modeling_xvlm.quantize_int8(m) for m in (retrieval, vqa))}
    ids, mask = make_text(32, 30, vocab, min_length=8)
    with torch.no_grad():
        images = retrieval.xvlm.encode_image(make_pixels(32, config.image_size)).last_hidden_state
        states = retrieval.xvlm.encode_text(ids, mask).last_hidden_state
    answers, answer_mask = make_text(32, 6, vocab, min_length=3, seed=SEED + 1)
    questions = torch.randn(32, 30, hidden, generator=torch.Generator().manual_seed(SEED))

    def text(model):
        return lambda: model.get_text_features(ids, mask).pooler_output

    def fusion(model):
        return lambda: itm_scores(model, images, states, mask)

    def decoder(model):
        return lambda: model.text_decoder(input_ids=answers, attention_mask=answer_mask,
                                          encoder_hidden_states=questions, encoder_attention_mask=mask).logits

    return {name: tuple(make(models[v][0 if name != "decoder" else 1]) for v in VARIANTS)
            for name, make in (("text", text), ("fusion", fusion), ("decoder", decoder))}


def _retrieval_agreement(log) -> dict[str, Any]:
    import modeling_xvlm
    from modeling_xvlm.retrieval import retrieval_metrics, score_matrices

    from .retrieval_eval import synthetic_test_gallery, trained_gallery_model

    folder, training = trained_gallery_model("tiny", log)
    model = modeling_xvlm.XVLMForRetrieval.from_pretrained(folder).eval()
    pixels, ids, mask, txt2img, img2txt = synthetic_test_gallery(folder)
    rankings = {v: m.rank(pixels, ids, mask, k=16)  # `rank` runs without gradients
                for v, m in (("fp32", model), ("int8", modeling_xvlm.quantize_int8(model)))}
    fp32, int8 = rankings["fp32"], rankings["int8"]
    recall = {v: retrieval_metrics(*score_matrices(r), txt2img.tolist(), img2txt) for v, r in rankings.items()}
    return {
        "n_images": len(img2txt), "n_texts": int(ids.shape[0]), "k": 16, "training": training,
        "same_top1_text_to_image": float((fp32.t2i_indices[:, 0] == int8.t2i_indices[:, 0]).float().mean()),
        "same_top1_image_to_text": float((fp32.i2t_indices[:, 0] == int8.i2t_indices[:, 0]).float().mean()),
        "r1": {v: {"txt_r1": m["txt_r1"], "img_r1": m["img_r1"]} for v, m in recall.items()},
    }


def _grounding_agreement(log) -> dict[str, Any]:
    import modeling_xvlm
    from modeling_xvlm.box_ops import inclusive_pixel_iou
    from modeling_xvlm.data import load_xvlm_dataset
    from modeling_xvlm.processing import XVLMProcessor
    from modeling_xvlm.training import evaluate_grounding

    from .retrieval_eval import trained_gallery_model

    folder, training = trained_gallery_model("tiny", log, task="grounding")
    model = modeling_xvlm.XVLMForGrounding.from_pretrained(folder).eval()
    processor = XVLMProcessor.from_pretrained(folder)
    rows = load_xvlm_dataset(None, "grounding", "test")
    results = {v: evaluate_grounding(m, processor, rows, return_predictions=True)
               for v, m in (("fp32", model), ("int8", modeling_xvlm.quantize_int8(model)))}
    fp32 = torch.stack([torch.as_tensor(b, dtype=torch.float64) for b in results["fp32"]["predictions"]])
    int8 = torch.stack([torch.as_tensor(b, dtype=torch.float64) for b in results["int8"]["predictions"]])
    iou = inclusive_pixel_iou(fp32, int8)
    return {
        "n_expressions": len(rows), "training": training,
        "same_box_iou_0.9": float((iou >= 0.9).double().mean()), "min_iou": float(iou.min()),
        "acc@0.5": {v: r["acc@0.5"] for v, r in results.items()},
    }


class Int8Case(Case):
    number = "8"
    unit = "items"
    key = "int8_inference"
    title = "int8 dynamic quantization of the text, fusion and decoder linear layers (CPU), against fp32"
    items = 32

    def worker(self, warmup: int, repeats: int, log) -> dict[str, Any]:
        workloads = _speed_workloads(self.quick)
        calls, agreement = {}, {}
        for name, (fp32, int8) in workloads.items():
            with torch.no_grad():
                reference, quantized = fp32(), int8()
            agreement[name] = {"max_abs_diff": float((reference - quantized).abs().max()),
                               "reference_max_abs": float(reference.abs().max())}
            if reference.dim() > 1:
                agreement[name]["cosine_min"] = cosine_min(reference, quantized)
            for variant, call in zip(VARIANTS, (fp32, int8)):
                calls[f"{name}/{variant}"] = torch.no_grad()(call)
        log(f"    output agreement {agreement}")
        timings = measure_interleaved(calls, max(0, warmup - 1), repeats, log)
        results = {name: {"variant": {"name": name, "attn": "sdpa", "precision": name.split("/")[1]},
                          **timings[name].summary(self.items)} for name in calls}
        trained = {"retrieval": _retrieval_agreement(log), "grounding": _grounding_agreement(log)}
        log(f"    trained agreement {trained}")
        return {"case": self.describe(), "results": results, "agreement": agreement, "trained": trained,
                "torch_threads": torch.get_num_threads()}

    def compile_variants(self) -> list:
        return []


def int8_cases(quick: bool = False) -> list[Case]:
    return [Int8Case(quick=quick)]
