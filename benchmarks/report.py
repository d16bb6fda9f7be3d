"""Markdown tables from `benchmarks/results.json`; `write_report` replaces the generated block of
`docs/benchmarks.md` (between the BEGIN/END markers) and leaves the hand-written text around it alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BEGIN = "<!-- BEGIN GENERATED: python -m benchmarks.run (do not edit by hand) -->"
END = "<!-- END GENERATED -->"

PLAIN = ["eager/fp32", "sdpa/fp32", "eager/bf16", "sdpa/bf16"]
COMPILED = ["sdpa/fp32/compile", "sdpa/bf16/compile"]


#: cases with a table of their own (not the variant tables)
OWN_TABLES = ("retrieval_eval", "attention_kernels", "vqa_rank", "int8_inference", "retrieval_scale", "padding_free",
              "data_pipeline", "converter_memory", "caption_beam")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:,.0f}" if seconds >= 0.1 else f"{seconds * 1000:.1f}"


def _cell(result: dict[str, Any] | None) -> str:
    if not result:
        return "n/a"
    if "median_s" not in result:
        reason = result.get("skipped") or result.get("error") or "n/a"
        return f"n/a ({_short(reason)})"
    spread = result.get("spread")
    text = f"{_ms(result['median_s'])}"
    if spread is not None and spread >= 0.15:
        text += f" (best {_ms(result['min_s'])})"
    return text


def _short(reason: str, limit: int = 60) -> str:
    reason = reason.splitlines()[0] if reason else ""
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def _ratio(numerator: dict | None, denominator: dict | None) -> str:
    """`numerator time / denominator time` (the speed-up of the denominator variant): of the medians, and in
    parentheses of the fastest runs."""
    if not numerator or not denominator or "median_s" not in numerator or "median_s" not in denominator:
        return "n/a"
    median = numerator["median_s"] / denominator["median_s"]
    best = numerator["min_s"] / denominator["min_s"]
    return f"{median:.2f}x ({best:.2f}x)"


def _variant_results(case: dict[str, Any]) -> dict[str, Any]:
    results = dict(case.get("results", {}))
    for name, value in case.get("compile", {}).items():
        results[name] = value
    return results


def render_main_table(data: dict[str, Any]) -> str:
    lines = [
        "| # | benchmark | eager fp32 | sdpa fp32 | eager bf16 | sdpa bf16 | compile sdpa fp32 | compile sdpa bf16 "
        "| bf16 speed-up (sdpa) | sdpa vs eager (fp32) | compile speed-up (fp32 / bf16) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, case in data["cases"].items():
        if key.startswith(OWN_TABLES):
            continue
        info = case.get("case", {})
        title = f"{info.get('title', key)} (`{key}`)"
        if "results" not in case:
            reason = case.get("skipped") or case.get("error") or "not run"
            lines.append(f"| {info.get('number', '')} | {title} | n/a: {_short(reason, 90)} |||||||||")
            continue
        results = _variant_results(case)
        cells = [_cell(results.get(name)) for name in PLAIN + COMPILED]
        bf16 = _ratio(results.get("sdpa/fp32"), results.get("sdpa/bf16"))
        sdpa = _ratio(results.get("eager/fp32"), results.get("sdpa/fp32"))
        compiled = " / ".join(
            _ratio(
                (results.get(f"sdpa/{p}/compile") or {}).get("plain_same_run") or results.get(f"sdpa/{p}"),
                results.get(f"sdpa/{p}/compile"),
            )
            for p in ("fp32", "bf16")
        )
        row = " | ".join(cells)
        lines.append(f"| {info.get('number', '')} | {title} | {row} | {bf16} | {sdpa} | {compiled} |")
    return "\n".join(lines)


def render_throughput_table(data: dict[str, Any]) -> str:
    lines = [
        "| benchmark | unit | eager fp32 | sdpa fp32 | eager bf16 | sdpa bf16 | compile sdpa fp32 "
        "| compile sdpa bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, case in data["cases"].items():
        if key.startswith(OWN_TABLES) or "results" not in case:
            continue
        results = _variant_results(case)
        unit = case.get("case", {}).get("unit", "items")
        cells = []
        for name in PLAIN + COMPILED:
            value = results.get(name) or {}
            cells.append(f"{value['items_per_s']:.1f}" if "items_per_s" in value else "n/a")
        lines.append(f"| `{key}` | {unit}/s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_cpu_table(data: dict[str, Any]) -> str:
    names = PLAIN + ["sdpa/fp32/ckpt"]
    lines = [
        "| benchmark | threads | " + " | ".join(n.replace("/", " ") for n in names)
        + " | bf16 speed-up (sdpa) | sdpa vs eager (fp32) |",
        "|---|---|" + "---|" * (len(names) + 2),
    ]
    for key, case in data["cases"].items():
        if key.startswith(OWN_TABLES) or "results" not in case:
            continue
        results = case["results"]
        if not any((r or {}).get("cpu_median_s") for r in results.values()):
            continue
        cells = []
        for name in names:
            value = (results.get(name) or {}).get("cpu_median_s")
            cells.append("" if name not in results else ("n/a" if value is None else f"{value:.2f}"))
        bf16 = _fmt(_speedup(results.get("sdpa/fp32"), results.get("sdpa/bf16"), "cpu_median_s"))
        sdpa = _fmt(_speedup(results.get("eager/fp32"), results.get("sdpa/fp32"), "cpu_median_s"))
        threads = case.get("case", {}).get("threads") or case.get("torch_threads")
        lines.append(f"| `{key}` | {threads} | " + " | ".join(cells) + f" | {bf16} | {sdpa} |")
    return "\n".join(lines)


def render_memory_table(data: dict[str, Any]) -> str:
    names = PLAIN + ["sdpa/fp32/ckpt", "sdpa/bf16/ckpt"] + COMPILED
    lines = [
        "| benchmark | " + " | ".join(n.replace("/", " ") for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, case in data["cases"].items():
        if key.startswith(OWN_TABLES) or "results" not in case:
            continue
        results = _variant_results(case)
        cells = []
        for name in names:
            value = (results.get(name) or {}).get("peak_extra_mib")
            cells.append("" if name not in results else ("n/a" if value is None else f"{value:,.0f}"))
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_agreement_table(data: dict[str, Any]) -> str:
    lines = ["| benchmark | variant | reference | agreement |", "|---|---|---|---|"]
    for key, case in data["cases"].items():
        if key.startswith(OWN_TABLES) or "results" not in case:
            continue
        agreements = dict(case.get("agreement", {}))
        for name, value in case.get("compile", {}).items():
            if isinstance(value, dict) and "agreement" in value:
                agreements[name] = value["agreement"]
        for name, value in agreements.items():
            metrics = ", ".join(
                f"{metric} = {number:.6f}" if isinstance(number, float) else f"{metric} = {number}"
                for metric, number in value.items()
                if metric != "reference"
            )
            lines.append(f"| `{key}` | {name} | {value.get('reference')} | {metrics} |")
    return "\n".join(lines)


def _ranking_cell(agreement: dict[str, Any]) -> str:
    if agreement.get("rankings_identical"):
        return "yes"
    if agreement.get("rankings_identical_up_to_ties_1e-5"):
        return "yes, up to ties (\\|Δ\\| < 1e-5)"
    if not agreement.get("same_candidates"):
        return "no (other ITC candidates)"
    return "no"


PRECISION_NAMES = {"fp32": "fp32", "bf16": "bf16", "bf16-rerank": "fp32 encoders, bf16 re-ranking"}


def _top1_cell(agreement: dict[str, Any]) -> str:
    share = agreement.get("top1_agreement")
    if share is None:
        return "n/a"
    cell = f"{share * 100:.1f}%"
    moved = agreement.get("top1_flips_with_other_candidates", 0)
    if share < 1 and moved:
        cell += f" ({moved} of {agreement.get('top1_flips')} flips: other ITC candidates)"
    return cell


def _r1_cell(agreement: dict[str, Any]) -> str:
    r1, reference = agreement.get("r1"), agreement.get("r1_reference")
    if not r1:
        return "n/a"
    text = f"{r1[0]:.1f} / {r1[1]:.1f}"
    return text if r1 == reference else f"{text} (official {reference[0]:.1f} / {reference[1]:.1f})"


def render_retrieval_tables(data: dict[str, Any]) -> str:
    blocks = []
    for key, case in data["cases"].items():
        if not key.startswith("retrieval_eval"):
            continue
        info = case.get("case", {})
        blocks.append(f"**{info.get('title', key)}** (`{key}`, fast-path batch {info.get('batch_size')} pairs)\n")
        if "retrieval" not in case:
            reason = case.get("skipped") or case.get("error") or "not run"
            blocks.append(f"n/a: {_short(reason, 200)}\n")
            continue
        training = info.get("training")
        if training:
            blocks.append(f"Gallery model: `{training.get('recipe')}` ({training.get('train_s', 0):.0f} s, final "
                          f"ITM loss {training.get('last_losses', {}).get('loss_itm', float('nan')):.3f}).\n")
        encode = case["retrieval"].get("encode", {})
        if encode:
            blocks.append(
                "Encoding (every image and text once; same code in every protocol): "
                + ", ".join(f"{name} {value['median_s']:.2f} s" for name, value in encode.items())
                + ".\n"
            )
        for k_name, per_k in case["retrieval"].items():
            if not k_name.startswith("k="):
                continue
            official_pairs = per_k.get("_official_pairs")
            blocks.append(f"{k_name} (official protocol: {official_pairs:,} fusion passes)\n")
            blocks.append(
                "| protocol | precision | attention | runs | encode s | re-rank s | total s | re-rank CPU s "
                "| pairs fused (re-scored in fp32) | speed-up vs official fp32: re-rank / total "
                "| CPU-time speed-up: re-rank / total | rankings = official fp32 | top-1 = official fp32 "
                "| R@1 text / image | peak extra MiB (re-rank) |"
            )
            blocks.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            base = per_k.get("official/fp32/sdpa")
            for name, row in per_k.items():
                if name.startswith("_"):
                    continue
                variant = row["variant"]
                agreement = row.get("agreement_vs_official_fp32_sdpa", {})
                pairs = row.get("pairs_scored") or official_pairs
                refined = row.get("pairs_refined")
                pairs_cell = f"{pairs:,}" + (f" ({refined:,})" if refined is not None else "")
                spread = ""
                if row.get("rerank_max_s") and row["rerank_s"] and row.get("runs", 1) > 1:
                    rel = (row["rerank_max_s"] - row["rerank_min_s"]) / row["rerank_s"]
                    spread = f" (±{rel * 50:.0f}%)" if rel >= 0.15 else ""
                speed = (f"{base['rerank_s'] / row['rerank_s']:.2f}x / {base['total_s'] / row['total_s']:.2f}x"
                         if base else "n/a")
                cpu = row.get("rerank_cpu_s")
                cpu_speed = (
                    f"{base['rerank_cpu_s'] / cpu:.2f}x / {base['total_cpu_s'] / row['total_cpu_s']:.2f}x"
                    if base and cpu and base.get("rerank_cpu_s") else "n/a"
                )
                peak = row.get("peak_extra_mib")
                blocks.append(
                    f"| {variant['protocol']} | {PRECISION_NAMES.get(variant['precision'], variant['precision'])} | "
                    f"{variant['attn']} | {row.get('runs')} | {row['encode_s']:.2f} | "
                    f"{row['rerank_s']:.2f}{spread} | {row['total_s']:.2f} | "
                    f"{'n/a' if cpu is None else f'{cpu:.2f}'} | {pairs_cell} | {speed} | {cpu_speed} | "
                    f"{_ranking_cell(agreement)} | {_top1_cell(agreement)} | {_r1_cell(agreement)} | "
                    f"{'n/a' if peak is None else f'{peak:,.0f}'} |"
                )
            blocks.append("")
    return "\n".join(blocks)


def render_answer_ranking_table(data: dict[str, Any]) -> str:
    rows = []
    for key, case in data.get("cases", {}).items():
        if not key.startswith("vqa_rank"):
            continue
        if "results" not in case:
            rows.append(f"| `{key}` | n/a: {_short(case.get('skipped') or case.get('error') or 'not run', 120)} ||||||")
            continue
        official, fast = case["results"].get("official/fp32/sdpa"), case["results"].get("fast/fp32/sdpa")
        agreement = case.get("agreement", {})
        rows.append(
            f"| `{key}` | {_cell(official)} | {_cell(fast)} | {_both(official, fast)} | "
            f"{_fmt(_speedup(official, fast, 'cpu_median_s'))} | "
            f"{'yes' if agreement.get('same_chosen_answers') else 'no'} / "
            f"{'yes' if agreement.get('same_rankings') else 'no'} | {agreement.get('score_max_abs_diff', float('nan')):.2e} |"
        )
    if not rows:
        return "n/a: not run"
    return "\n".join([
        "| case | official order (ms) | first-step cache (ms) | speed-up (best) | CPU-time speed-up "
        "| same answers / rankings | largest score gap |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])


def _agreement_cells(agreement: dict[str, Any]) -> str:
    difference = agreement.get("max_abs_diff")
    if difference is None:
        return "n/a | n/a"
    cosine = agreement.get("cosine_min")
    return (f"{difference:.3g} ({agreement['reference_max_abs']:.3g}) | "
            f"{'n/a' if cosine is None else f'{cosine:.5f}'}")


def _not_run(case: dict[str, Any] | None) -> str:
    """The `n/a: reason` line of a case without results."""
    return f"n/a: {_short((case or {}).get('skipped') or (case or {}).get('error') or 'not run', 120)}"


def render_int8_tables(data: dict[str, Any]) -> str:
    case = data.get("cases", {}).get("int8_inference")
    if not case or "results" not in case:
        return _not_run(case)
    results, agreement = case["results"], case.get("agreement", {})
    lines = [
        "| workload (base size, 32 items) | fp32 (ms) | int8 (ms) | speed-up (best) | CPU-time speed-up "
        "| largest difference (largest fp32 value) | row cosine (min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("text", "fusion", "decoder"):
        fp32, int8 = results.get(f"{name}/fp32"), results.get(f"{name}/int8")
        lines.append(
            f"| {name} | {_cell(fp32)} | {_cell(int8)} | {_both(fp32, int8)} | "
            f"{_fmt(_speedup(fp32, int8, 'cpu_median_s'))} | {_agreement_cells(agreement.get(name, {}))} |"
        )
    trained = case.get("trained", {})
    retrieval, grounding = trained.get("retrieval", {}), trained.get("grounding", {})
    if retrieval and grounding:
        r1 = retrieval["r1"]
        lines += [
            "",
            "| trained tiny model, synthetic test split | int8 = fp32 | fp32 | int8 |",
            "|---|---|---|---|",
            f"| retrieval, top-1 image of each of {retrieval['n_texts']} texts | "
            f"{100 * retrieval['same_top1_text_to_image']:.1f} % | image R@1 {r1['fp32']['img_r1']:.2f} | "
            f"{r1['int8']['img_r1']:.2f} |",
            f"| retrieval, top-1 text of each of {retrieval['n_images']} images | "
            f"{100 * retrieval['same_top1_image_to_text']:.1f} % | text R@1 {r1['fp32']['txt_r1']:.2f} | "
            f"{r1['int8']['txt_r1']:.2f} |",
            f"| grounding, box of each of {grounding['n_expressions']} expressions (IoU >= 0.9 with fp32) | "
            f"{100 * grounding['same_box_iou_0.9']:.1f} % (min IoU {grounding['min_iou']:.3f}) | "
            f"Acc@0.5 {grounding['acc@0.5']['fp32']:.2f} | {grounding['acc@0.5']['int8']:.2f} |",
            "",
            f"Trained models: retrieval {retrieval['training'].get('recipe')}; grounding "
            f"{grounding['training'].get('recipe')}.",
        ]
    return "\n".join(lines)


#: the padded computation's speed against the official `xbert.py` (same inputs, fp32, alternating runs), measured
#: in the issue that asked for the padding-free layers (official / ours, higher is better)
PADDED_VS_OFFICIAL = {"text_b32_l30": (0.97, 1.02), "fusion_32p": (0.98, 1.08), "train_retrieval_224_b4": (1.04, 1.12)}


def render_padding_free_table(data: dict[str, Any]) -> str:
    case = data.get("cases", {}).get("padding_free")
    if not case or "results" not in case:
        return _not_run(case)
    results, agreement, real = case["results"], case.get("agreement", {}), case.get("real_token_fraction", {})
    lines = [
        "| workload (base size) | real tokens | padded (ms) | padding-free (ms) | speed-up: median (best) | CPU-time speed-up "
        "| implied vs official fp32 | outputs: largest difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in agreement:
        padded, free = results.get(f"{name}/padded"), results.get(f"{name}/padding-free")
        speed = _speedup(padded, free, "median_s")
        implied = PADDED_VS_OFFICIAL.get(name)
        implied_cell = "n/a" if speed is None or implied is None else (
            f"{speed * implied[0]:.2f}-{speed * implied[1]:.2f}x")
        check = agreement[name]
        difference = (f"{check['max_abs_diff']:.2g} (of {check['reference_max_abs']:.3g})" if "max_abs_diff" in check
                      else f"loss relative {check.get('loss_rel_diff', float('nan')):.2g}")
        lines.append(
            f"| `{name}` | {100 * real.get(name, float('nan')):.0f} % | {_cell(padded)} | {_cell(free)} | "
            f"{_both(padded, free)} | {_fmt(_speedup(padded, free, 'cpu_median_s'))} | {implied_cell} | {difference} |"
        )
    return "\n".join(lines)


def render_caption_table(data: dict[str, Any]) -> str:
    """Benchmark 13: end to end, and the decoding alone (each variant's median minus the vision encoder's, timed in
    the same rounds), per step (the decoding over the decoder calls)."""
    rows = []
    for key, case in data.get("cases", {}).items():
        if not key.startswith("caption_beam"):
            continue
        if "results" not in case:
            rows.append(f"| `{key}` | {_not_run(case)} |||||||||")
            continue
        results, agreement, structure = case["results"], case.get("agreement", {}), case.get("structure", {})
        official, ours = results.get("official/fp32/sdpa"), results.get("ours/fp32/sdpa")
        vision = (results.get("vision/fp32/sdpa") or {}).get("median_s")
        decode = {}
        for name, result in (("official", official), ("ours", ours)):
            if result and vision is not None:
                seconds = result["median_s"] - vision
                calls = structure.get(f"{name}/fp32/sdpa", {}).get("decoder_calls")
                decode[name] = (seconds, seconds / calls if calls else None)
        both = len(decode) == 2 and decode["ours"][0] > 0
        decode_cell, step_cell = "n/a", "n/a"
        if both:
            (slow, slow_step), (fast, fast_step) = decode["official"], decode["ours"]
            decode_cell = f"{_ms(slow)} / {_ms(fast)} ({slow / fast:.2f}x)"
            step_cell = f"{_ms(slow_step)} / {_ms(fast_step)}" if fast_step else "n/a"
        rows_cell = " / ".join(
            str(structure.get(f"{name}/fp32/sdpa", {}).get("cross_key_rows", "n/a")) for name in ("official", "ours")
        )
        rows.append(
            f"| `{key}` | {_cell(official)} | {_cell(ours)} | {_both(official, ours)} | "
            f"{_fmt(_speedup(official, ours, 'cpu_median_s'))} | {_ms(vision)} | {decode_cell} | {step_cell} | "
            f"{rows_cell} | {'yes' if agreement.get('same_tokens') else 'no'} "
            f"({agreement.get('score_max_abs_diff', float('nan')):.1e}) |"
        )
    if not rows:
        return "n/a: not run"
    return "\n".join([
        "| case | official structure (ms) | shipped (ms) | speed-up (best) | CPU-time speed-up | vision encoder (ms) "
        "| decoding: official / shipped (ms) | per decoder step (ms) | image sequences projected to keys (per layer, all steps) "
        "| same tokens (largest score gap) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def render_scale_tables(data: dict[str, Any]) -> str:
    case = data.get("cases", {}).get("retrieval_scale")
    if not case or "rows" not in case:
        return _not_run(case)

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.0f}"

    lines = [
        "| model | images | texts | pairs scored | encode images (s) | encode texts (s) | re-rank (s) | total (s) "
        "| encoded gallery (MiB) | re-rank peak extra (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in (("small", case["rows"]), ("base", case["base"]["rows"])):
        for r in rows:
            lines.append(
                f"| {model} | {r['n_images']:,} | {r['n_texts']:,} | {r['pairs']:,} | {r['images_s']:.2f} | "
                f"{r['texts_s']:.2f} | {r['rerank_s']:.2f} | {r['total_s']:.2f} | {mib(r['encoded_gallery_mib'])} | "
                f"{mib(r['rerank_peak_extra_mib'])} |"
            )
    lines += ["", "| fitted cost | small | base |", "|---|---|---|"]
    for key, name in (("s_per_image", "per image (ms)"), ("s_per_text", "per text (ms)"),
                      ("s_per_pair", "per scored pair (ms)")):
        lines.append(f"| {name} | {1000 * case['fit'][key]:.2f} | {1000 * case['base']['fit'][key]:.2f} |")
    coco = case["base"]["coco"]
    lines += [
        "",
        f"Projection at base size for COCO 5k images / 25k texts, k 256, on this CPU: encode images "
        f"{coco['images_s'] / 60:.0f} min, texts {coco['texts_s'] / 60:.0f} min, re-rank at most "
        f"{coco['pairs_upper_bound']:,} pairs {coco['rerank_s'] / 3600:.1f} h; total at most "
        f"{coco['total_s'] / 3600:.1f} h.",
    ]
    return "\n".join(lines)


STREAM_NAMES = {"image_text": "image-text", "region": "region"}


def _headroom(worker: dict[str, Any]) -> str:
    return f"{worker['headroom']:,.1f}x" + (" (**bottleneck**)" if worker["bottleneck"] else "")


def render_data_pipeline_tables(data: dict[str, Any]) -> str:
    case = data.get("cases", {}).get("data_pipeline")
    if not case or "pipeline" not in case:
        return _not_run(case)
    dataset, model = case["dataset"], case["model"]
    lines = [
        f"{dataset['rows']} rows of {dataset['width']} x {dataset['height']} JPEGs "
        f"(mean {dataset['jpeg_kib_mean']:.0f} KiB), image size {case['image_size']}, shuffle buffer "
        f"{case['shuffle_buffer']} (streaming), {case.get('torch_threads')} torch threads.",
        "",
        "| stream | path | batch | workers | untimed first batches (s) | timed batches | ms per batch | images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in case["pipeline"]:
        first = f"{r['untimed_s']:.2f} ({r['untimed_batches']})"
        if r["path"] == "streaming":
            first += f"; end of pass {r['pass_end_extra_s']:.2f}"
        lines.append(f"| {STREAM_NAMES[r['stream']]} | {r['path']} | {r['batch']} | {r['workers']} | {first} | "
                     f"{r['batches']} | {r['ms_per_batch']:,.1f} | {r['images_per_s']:,.1f} |")
    lines += [
        "",
        f"| stream (batch {model['batch']}) | training step, {model['preset']} (ms) | step images/s "
        "| streaming pipeline ms per batch | pipeline / step | pipeline share of the loop (0 workers) "
        "| pipeline / step rate: 0 workers | 1 worker | 2 workers | pipeline processes to keep up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stream, b in case["bottleneck"].items():
        workers = [_headroom(b["workers"][w]) if w in b["workers"] else "n/a" for w in ("0", "1", "2")]
        lines.append(
            f"| {STREAM_NAMES[stream]} | {_cell(model[stream])} | {b['step_images_per_s']:.2f} | "
            f"{1000 * b['streaming_batch_s']:,.1f} | {100 * b['streaming_fraction_of_step']:.2f} % | "
            f"{100 * b['streaming_share_of_loop']:.2f} % | {' | '.join(workers)} | {b['processes_to_keep_up']} |"
        )
    per_process = {r["stream"]: r["images_per_s"] for r in case["pipeline"]
                   if r["path"] == "map" and r["workers"] == 0 and r["batch"] == model["batch"]}
    lines += [
        "",
        f"One process builds {per_process.get('image_text', float('nan')):,.0f} image-text and "
        f"{per_process.get('region', float('nan')):,.0f} region images per second at batch {model['batch']} on "
        "this CPU: a device whose step consumes R images/s needs about R / that rate workers per process.",
    ]
    return "\n".join(lines)


def render_converter_table(data: dict[str, Any]) -> str:
    case = data.get("cases", {}).get("converter_memory")
    if not case or "rows" not in case:
        return _not_run(case)
    lines = [
        f"{case['images']} distinct {case['image_px'][0]} x {case['image_px'][1]} JPEGs (mean "
        f"{case['image_kib_mean']:.1f} KiB) cycled through the lines; shards of {case['shard_bytes'] / 2**20:,.0f} "
        "MiB; each conversion in its own process.",
        "",
        "| lines | rows written | shards | output (MiB) | seconds | lines/s | RSS after imports (MiB) "
        "| peak RSS (MiB) | peak above imports (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in case["rows"]:
        extra = "n/a" if r["peak_above_baseline_mib"] is None else f"{r['peak_above_baseline_mib']:,.0f}"
        lines.append(
            f"| {r['lines']:,} | {r['rows_written']:,} | {r['shards']} | {r['output_mib']:,.1f} | {r['seconds']:.1f} | "
            f"{r['lines_per_s']:,.0f} | {r['baseline_rss_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | {extra} |"
        )
    first, last = case["rows"][0], case["rows"][-1]
    lines += ["", f"Peak RSS at {last['lines']:,} lines / at {first['lines']:,} lines: {case['peak_ratio']:.3f}."]
    return "\n".join(lines)


def render_kernel_table(data: dict[str, Any]) -> str:
    case = data.get("cases", {}).get("attention_kernels")
    if not case or "kernels" not in case:
        reason = (case or {}).get("error") or (case or {}).get("skipped") or "not run"
        return f"n/a: {_short(reason, 200)}"
    lines = [
        f"Median of {case.get('calls_per_median')} calls, {case.get('torch_threads')} threads. Training = forward + "
        "backward (text and fusion with attention dropout 0.1 unless marked, Swin with a relative-position bias "
        "that needs a gradient).",
        "",
        "| call | precision | mode | eager ms | torch SDPA ms | torch SDPA / eager | X-VLM `sdpa` runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in case["kernels"]:
        lines.append(
            f"| {row['shape']} | {row['precision']} | {row['mode']} | {row['eager_ms']:.2f} | "
            f"{row['torch_sdpa_ms']:.2f} | {row['torch_sdpa_ms'] / row['eager_ms']:.2f} | {row['xvlm_sdpa_picks']} |"
        )
    return "\n".join(lines)


def _speedup(slow: dict | None, fast: dict | None, key: str = "median_s") -> float | None:
    if not slow or not fast or key not in slow or key not in fast or not fast[key]:
        return None
    return slow[key] / fast[key]


def _fmt(value: float | None, suffix: str = "x", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _both(slow: dict | None, fast: dict | None) -> str:
    """Speed-up of the medians, and of the fastest runs in parentheses."""
    median = _speedup(slow, fast, "median_s")
    best = _speedup(slow, fast, "min_s")
    return f"{_fmt(median)} ({_fmt(best)})"


def render_summary(data: dict[str, Any]) -> str:
    """The ratios the issue asks for, computed from the JSON (no number here is typed by hand)."""
    lines = []
    cases = data.get("cases", {})
    # bf16 vs fp32 on benchmarks 1-3
    bf16_rows = []
    for key, case in cases.items():
        if case.get("case", {}).get("number") not in ("1", "2", "3") or "results" not in case:
            continue
        results = case["results"]
        agreement = case.get("agreement", {}).get("sdpa/bf16", {})
        metric = next((f"{m} {v:.6f}" for m, v in agreement.items() if m != "reference"), "n/a")
        cpu = _speedup(results.get("sdpa/fp32"), results.get("sdpa/bf16"), "cpu_median_s")
        bf16_rows.append(
            f"`{key}` {_both(results.get('sdpa/fp32'), results.get('sdpa/bf16'))} with sdpa, "
            f"{_both(results.get('eager/fp32'), results.get('eager/bf16'))} with eager"
            + (f", CPU time {_fmt(cpu)} with sdpa" if cpu else "")
            + f"; {metric}"
        )
    if bf16_rows:
        lines.append("- **bf16 autocast vs fp32** (time fp32 / time bf16 of the medians, and of the fastest runs in "
                     "parentheses; agreement of the bf16 output with fp32): "
                     + "; ".join(bf16_rows) + ".")
    for suffix in ("", "@1t"):
        full, shared = cases.get(f"fusion_32p{suffix}", {}), cases.get(f"fusion_32p_8img_shared{suffix}", {})
        if "results" in full and "results" in shared:
            a, b = full["results"].get("sdpa/fp32"), shared["results"].get("sdpa/fp32")
            cpu = _speedup(a, b, "cpu_median_s")
            lines.append(
                f"- **Image keys/values shared** (`fuse(..., image_index=...)`, 32 pairs of 8 images vs 32 images, "
                f"sdpa fp32{', one thread' if suffix else ''}): {_both(a, b)}"
                + (f", CPU time {_fmt(cpu)}" if cpu else "") + "."
            )
    train = cases.get("train_retrieval_224_b4", {})
    if "results" in train:
        r = train["results"]
        memory = [
            (r.get(name) or {}).get("peak_extra_mib") for name in ("sdpa/fp32", "sdpa/fp32/ckpt")
        ]
        memory_text = (
            f"peak extra memory {memory[0]:,.0f} MiB without and {memory[1]:,.0f} MiB with activation checkpointing"
            if None not in memory else "memory n/a"
        )
        lines.append(
            f"- **Training step** (benchmark 4): sdpa vs eager {_both(r.get('eager/fp32'), r.get('sdpa/fp32'))}"
            f" in fp32 (CPU time {_fmt(_speedup(r.get('eager/fp32'), r.get('sdpa/fp32'), 'cpu_median_s'))}), "
            f"{_both(r.get('eager/bf16'), r.get('sdpa/bf16'))} in bf16; bf16 vs fp32 "
            f"{_both(r.get('sdpa/fp32'), r.get('sdpa/bf16'))}; with activation checkpointing the step runs at "
            f"{_both(r.get('sdpa/fp32'), r.get('sdpa/fp32/ckpt'))} the speed without, "
            f"{memory_text}."
        )
    for key, case in cases.items():
        if not key.startswith("retrieval_eval") or "retrieval" not in case:
            continue
        for k_name, per_k in case["retrieval"].items():
            if not k_name.startswith("k="):
                continue
            official = per_k.get("official/fp32/sdpa")
            parts = []
            for name in ("fast/fp32/sdpa", "fast-cls/fp32/sdpa", "fast/bf16/sdpa", "fast+top1/bf16/sdpa",
                         "fast+top1/bf16-rerank/sdpa"):
                row = per_k.get(name)
                if not row or not official:
                    continue
                agreement = row.get("agreement_vs_official_fp32_sdpa", {})
                if name.split("/")[1] == "fp32":
                    equal = {
                        "yes": "rankings identical",
                        "no": "RANKINGS DIFFER",
                    }.get(_ranking_cell(agreement), f"rankings: {_ranking_cell(agreement)}")
                    equal += f", max |Δscore| {agreement.get('max_abs_score_diff', float('nan')):.1e}"
                else:
                    cosine = min(agreement.get("itc_image_cosine_min", 1), agreement.get("itc_text_cosine_min", 1))
                    equal = (
                        f"top-1 = fp32 official for {_top1_cell(agreement)} of queries, R@1 {_r1_cell(agreement)}, "
                        f"ITC cosine >= {cosine:.5f}"
                    )
                cpu = _speedup(official, row, "rerank_cpu_s")
                parts.append(
                    f"`{name}` re-ranking {_fmt(_speedup(official, row, 'rerank_s'))}"
                    + (f" (CPU time {_fmt(cpu)})" if cpu else "")
                    + f", end to end {_fmt(_speedup(official, row, 'total_s'))} ({equal})"
                )
            if parts:
                lines.append(f"- **Retrieval evaluation `{key}` {k_name}** vs the official protocol (fp32, sdpa): "
                             + "; ".join(parts) + ".")
    for key, case in cases.items():
        if not key.startswith("caption_beam") or "results" not in case:
            continue
        r, agreement = case["results"], case.get("agreement", {})
        lines.append(
            f"- **Caption beam search `{key}`** (benchmark 13, shipped vs the official cost structure): "
            f"{_both(r.get('official/fp32/sdpa'), r.get('ours/fp32/sdpa'))} end to end (CPU time "
            f"{_fmt(_speedup(r.get('official/fp32/sdpa'), r.get('ours/fp32/sdpa'), 'cpu_median_s'))}), "
            f"{'identical' if agreement.get('same_tokens') else 'DIFFERENT'} tokens; the decoding alone in its table."
        )
    return "\n".join(lines) if lines else "(no results yet)"


def _run_machine(run: dict[str, Any]) -> str:
    """`CPU flags ..., ` of a run that recorded them (runs merged into one file can come from different hosts)."""
    if "cpu_flags" not in run:
        return ""
    return f"CPU flags {', '.join(run['cpu_flags'] or []) or 'none of avx512f / avx512_vnni / avx512_bf16 / amx'}, "


def render_tables(data: dict[str, Any]) -> str:
    machine = data.get("machine", {})
    settings = data.get("settings", {})
    header = [
        f"Machine: {machine.get('cpu')} ({machine.get('logical_cpus')} logical CPUs, torch threads "
        f"{machine.get('torch_threads')}, {machine.get('memory_gib')} GiB RAM, flags "
        f"{', '.join(machine.get('cpu_flags', [])) or 'n/a'}), GPU: {machine.get('gpu') or 'none'}; "
        f"Python {machine.get('python')}, torch {machine.get('torch')}, transformers {machine.get('transformers')}; "
        f"commit {machine.get('git_commit')}; run started {machine.get('date')} "
        f"(load average {machine.get('load_average_at_start')}).",
        "",
        f"Command: `{data.get('command')}`; {settings.get('warmup')} warm-up + {settings.get('repeats')} timed rounds "
        "per variant (variants interleaved round by round), median reported; where the runs of a variant spread by "
        "15% or more, the fastest run follows as (best ...). Ratios are given for the medians and, in parentheses, "
        "for the fastest runs. "
        "Benchmark 4 is capped at 9 timed rounds and benchmark 5 at 3 (the `runs` field of each result in the "
        "JSON). "
        f"Total wall time {data.get('total_wall_s', 0) / 60:.1f} min.",
        "",
        *(
            ["Runs combined in these tables (`python -m benchmarks.run --combine ...`): " + "; ".join(
                f"`{r['command']}` ({r['date']}, load average {r.get('load_average_at_start', 'n/a')}, "
                f"{_run_machine(r)}cases "
                f"{', '.join(r.get('cases', []))}{'; ' + r['note'] if r.get('note') else ''})"
                for r in data.get("runs", [])) + ".", ""]
            if len(data.get("runs", [])) > 1 else []
        ),
        *(
            [f"torch.compile variants: `{data['compile_run']['command']}` ({data['compile_run']['machine']['date']}, "
             f"load average {data['compile_run']['machine'].get('load_average_at_start')}); the compile speed-up "
             "compares with the plain sdpa variant timed in the same process, interleaved.", ""]
            if data.get("compile_run") else []
        ),
        "### Summary (computed from the results)",
        "",
        render_summary(data),
        "",
        "### Latency per call (ms, median)",
        "",
        render_main_table(data),
        "",
        "### Throughput (items per second at the median)",
        "",
        render_throughput_table(data),
        "",
        "### Process CPU time per call (s, median over the timed runs, all threads)",
        "",
        "CPU time counts only the time this process ran (all threads, including their spin-waiting for each "
        "other); it is insensitive to other processes on the machine, wall time is not.",
        "",
        render_cpu_table(data),
        "",
        "### Peak extra memory per call (MiB above the resident size before the call)",
        "",
        render_memory_table(data),
        "",
        "### Agreement of each variant with its reference (first call, same inputs)",
        "",
        render_agreement_table(data),
        "",
        "### 6. Retrieval evaluation, official protocol vs fast path",
        "",
        render_retrieval_tables(data),
        "",
        "### 7. VQA answer ranking, official order vs first-step cache (fp32, sdpa)",
        "",
        render_answer_ranking_table(data),
        "",
        "### 8. int8 dynamic quantization (CPU inference), against fp32",
        "",
        render_int8_tables(data),
        "",
        "### 9. Retrieval evaluation against gallery size (fast path, fp32, sdpa)",
        "",
        render_scale_tables(data),
        "",
        "### 10. Padding-free text and fusion layers against the padded computation (fp32, sdpa)",
        "",
        render_padding_free_table(data),
        "",
        "### 11. Pre-training input pipeline against DataLoader workers, next to the training step",
        "",
        render_data_pipeline_tables(data),
        "",
        "### 12. Official-format converter: memory against corpus size",
        "",
        render_converter_table(data),
        "",
        "### 13. Caption beam search, official cost structure vs shipped (fp32, sdpa)",
        "",
        render_caption_table(data),
        "",
        "### Attention kernels",
        "",
        render_kernel_table(data),
    ]
    return "\n".join(header)


def write_report(data: dict[str, Any], doc: Path) -> None:
    generated = f"{BEGIN}\n\n{render_tables(data)}\n\n{END}"
    if doc.exists():
        text = doc.read_text()
        if BEGIN in text and END in text:
            before = text[: text.index(BEGIN)]
            after = text[text.index(END) + len(END):]
            doc.write_text(before + generated + after)
            return
        doc.write_text(text.rstrip() + "\n\n" + generated + "\n")
        return
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("# Benchmarks\n\n" + generated + "\n")
