"""Benchmark 11: the pre-training input pipeline alone against the training step at X-VLM-base size, for sizing
`--num-workers`.

Data: a Hub-format `pretrain` folder written with `DatasetFolderWriter` in a temporary directory: photo-like JPEGs
(smooth random colour fields with grain, quality 90) at COCO's typical 640 x 480, three captions and 3-8 regions each
(captions and attributes from the synthetic vocabulary, so the synthetic tokenizer has no `[UNK]`).

Pipeline: the training path of `xvlm-train pretrain` (`build_task_data`: `PretrainImageTextCollator` and the region
`XVLMPretrainCollator`, with decode, random-resized crop, flip, RandAugment, tokenisation, MLM masking and collation)
at image size 224, through `make_loader` + `StepBatchSampler` with 0, 1 and 2 DataLoader workers, and through the
streaming path (`open_pretrain_stream` + `StreamingBatches`, main process only), at the benchmark batch (4) and at
the official per-GPU batches (128 images, 48 region images). Map-style: the first round of batches (one per
worker, startup included) is not timed, the next ones are. Streaming (`--shuffle-buffer` default 1000, more than the
rows, so that a pass reads all its rows into the buffer at its first batch): the first pass is not timed; the first
batch of the second pass is timed on its own (it carries the end of the first pass, the re-opening and the buffer
fill: the per-pass cost), then the rest of the second pass (the per-batch cost).

Model: `XVLMForPretraining` at X-VLM-base size (`XVLMConfig.from_preset("base", image_size=224)`, BERT vocabulary
size), fp32, sdpa, one image-text and one region step (forward + backward + clipping + AdamW step of the official
recipe) on a collated batch of 4, interleaved. The pipeline is a bottleneck at a worker count when it delivers fewer
images per second there than the step consumes. `--quick`: tiny preset and small images.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .cases import SEED, Case
from .harness import measure_interleaved

WORKERS = (0, 1, 2)
MODEL_BATCH = 4
#: the official per-GPU batches of `Pretrain_XVLM_base_4m.yaml`: images, region images
OFFICIAL_BATCH = {"image_text": 128, "region": 48}
BERT_VOCAB = 30522


def photo_like_jpeg(width: int, height: int, rng: np.random.Generator, quality: int = 90) -> bytes:
    """A JPEG of a smooth random colour field with fine grain: decodes and compresses like a photo, not like noise."""
    coarse = rng.uniform(0, 255, size=(max(2, height // 40), max(2, width // 40), 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, size=(height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _words(rng: np.random.Generator, low: int, high: int) -> str:
    from modeling_xvlm.data import synthetic_vocabulary

    vocabulary = [w for w in synthetic_vocabulary() if not w.startswith("[")]
    return " ".join(rng.choice(vocabulary, size=int(rng.integers(low, high + 1))))


def _region(rng: np.random.Generator, width: int, height: int) -> dict[str, Any]:
    w, h = float(rng.uniform(0.1, 0.6) * width), float(rng.uniform(0.1, 0.6) * height)
    x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
    return {"bbox": [x, y, w, h], "captions": [_words(rng, 2, 5)], "attributes": [_words(rng, 1, 1)]}


def pretrain_record(index: int, width: int, height: int, rng: np.random.Generator) -> dict[str, Any]:
    """One `pretrain` row: a photo-like JPEG, three captions of 8-20 words, 3-8 regions."""
    return {
        "image": {"bytes": photo_like_jpeg(width, height, rng), "path": None}, "image_id": str(index),
        "width": width, "height": height, "captions": [_words(rng, 8, 20) for _ in range(3)],
        "objects": [_region(rng, width, height) for _ in range(int(rng.integers(3, 9)))], "group": "regions",
    }


def write_pretrain_folder(out: Path, rows: int, width: int, height: int) -> dict[str, Any]:
    """A Hub-format dataset folder with `rows` `pretrain/train` rows; its size and mean JPEG size."""
    from modeling_xvlm.data import DatasetFolderWriter

    rng = np.random.default_rng(SEED)
    jpeg_bytes = 0
    with DatasetFolderWriter(out, pretty_name="benchmark 11 corpus") as writer:
        for index in range(rows):
            record = pretrain_record(index, width, height, rng)
            jpeg_bytes += len(record["image"]["bytes"])
            writer.add("pretrain", "train", record)
    return {"rows": rows, "width": width, "height": height, "jpeg_kib_mean": jpeg_bytes / rows / 1024}


def _train_config(folder: Path, quick: bool):
    from modeling_xvlm.training.train import TrainConfig

    overrides = {} if quick else {"text_config": {"vocab_size": BERT_VOCAB}}
    return TrainConfig(task="pretrain", model="tiny" if quick else "base", image_size=None if quick else 224,
                       tokenizer="synthetic", dataset=str(folder), config_overrides=overrides, seed=SEED)


def _time_batches(batches: Iterator[Any], untimed: int, timed: int) -> dict[str, float]:
    """Seconds to the end of the `untimed` first batches, then for the `timed` next ones."""
    start = time.perf_counter()
    for _ in range(untimed):
        next(batches)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(timed):
        next(batches)
    return {"untimed_batches": untimed, "untimed_s": first, "batches": timed, "seconds": time.perf_counter() - start}


def _time_stream(batches: Iterator[Any], per_pass: int) -> dict[str, float]:
    """Pass 1 untimed; the first batch of pass 2 (the end of pass 1, re-opening, shuffle-buffer fill) on its own;
    the rest of pass 2 timed, stopping before its end."""
    start = _time_batches(batches, per_pass, 1)
    rest = _time_batches(batches, 0, per_pass - 1)
    return {**rest, "untimed_batches": per_pass, "untimed_s": start["untimed_s"],
            "pass_start_s": start["seconds"], "pass_end_extra_s": start["seconds"] - rest["seconds"] / rest["batches"]}


def _streams(data: Any) -> dict[str, tuple[Callable, Callable]]:
    """`{stream: (collator, row adapter)}` of the pre-training task data."""
    return {"image_text": (data.image_collator, data.image_adapter),
            "region": (data.region_collator, data.region_adapter)}


def _row(stream: str, path: str, batch: int, workers: int, timing: dict[str, float]) -> dict[str, Any]:
    seconds, images = timing["seconds"], timing["batches"] * batch
    return {"stream": stream, "path": path, "batch": batch, "workers": workers, **timing,
            "ms_per_batch": 1000 * seconds / timing["batches"], "images_per_s": images / seconds}


class DataPipelineCase(Case):
    number = "11"
    key = "data_pipeline"
    title = ("pre-training input pipeline (decode + augment + collate) against DataLoader workers and streaming, "
             "next to the base-size training step")
    unit = "images"
    items = MODEL_BATCH

    def __init__(self, quick: bool = False):
        super().__init__(quick)
        self.rows, self.size = (16, (160, 120)) if quick else (256, (640, 480))
        self.batches = {"image_text": (MODEL_BATCH,), "region": (MODEL_BATCH,)} if quick else {
            name: (MODEL_BATCH, official) for name, official in OFFICIAL_BATCH.items()}

    def _timed_count(self, batch: int, workers: int) -> int:
        """Timed batches: at least 3 rounds of the workers, about 64 images at the small batch."""
        return max(3 * max(1, workers), 2 if self.quick else min(16, 64 // batch))

    def _map_rows(self, data: Any, log) -> list[dict[str, Any]]:
        from modeling_xvlm.training.data import StepBatchSampler, make_loader

        out = []
        for stream, (collator, adapter) in _streams(data).items():
            for batch in self.batches[stream]:
                for workers in WORKERS:
                    untimed, timed = max(1, workers), self._timed_count(batch, workers)
                    sampler = StepBatchSampler(len(data.rows), batch, SEED, stream, num_steps=untimed + timed)
                    loader = make_loader(data.rows, collator, sampler, adapter, workers)
                    out.append(_row(stream, "map", batch, workers, _time_batches(iter(loader), untimed, timed)))
                    log(f"    {out[-1]}")
        return out

    def _streaming_rows(self, folder: Path, data: Any, shuffle_buffer: int, log) -> list[dict[str, Any]]:
        from modeling_xvlm.training.streaming import StreamingBatches, open_pretrain_stream

        out = []
        for stream, (collator, adapter) in _streams(data).items():
            for batch in self.batches[stream]:
                rows = open_pretrain_stream(str(folder), "train", 0, 1, SEED, shuffle_buffer, stream)
                batches = StreamingBatches(rows, collator, batch, SEED, stream, 0, adapter)
                out.append(_row(stream, "streaming", batch, 0, _time_stream(batches, self.rows // batch)))
                log(f"    {out[-1]}")
        return out

    def _model(self, model: Any, data: Any, repeats: int, log) -> dict[str, Any]:
        """Median time of an image-text and a region training step on collated batches of `MODEL_BATCH`."""
        from modeling_xvlm.training.data import StepBatchSampler, make_loader
        from modeling_xvlm.training.recipe import create_optimizer, get_recipe, new_parameter_names

        recipe = get_recipe("pretrain")
        optimizer = create_optimizer(model, recipe.lr, recipe.weight_decay, recipe.lr_mult,
                                     new_parameter_names(model, "pretrain"), recipe.betas, recipe.eps)

        def step(batch: dict[str, Any]) -> Callable[[], float]:
            def run() -> float:
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return float(loss.detach())

            return run

        calls = {}
        for stream, (collator, adapter) in _streams(data).items():
            sampler = StepBatchSampler(len(data.rows), MODEL_BATCH, SEED, stream, num_steps=1)
            calls[stream] = step(dict(next(iter(make_loader(data.rows, collator, sampler, adapter)))))
        timings = measure_interleaved(calls, 1, repeats, log)
        return {"image_size": model.config.image_size, "batch": MODEL_BATCH,
                "parameters": sum(p.numel() for p in model.parameters()),
                **{name: timings[name].summary(MODEL_BATCH) for name in calls}}

    def worker(self, warmup: int, repeats: int, log) -> dict[str, Any]:
        from modeling_xvlm.data import load_xvlm_dataset, synthetic_tokenizer
        from modeling_xvlm.training.recipe import get_recipe
        from modeling_xvlm.training.train import build_model, build_processor, build_task_data

        root = Path(tempfile.mkdtemp(prefix="xvlm-bench11-"))
        try:
            dataset = write_pretrain_folder(root / "corpus", self.rows, *self.size)
            log(f"    dataset {dataset}")
            cfg = _train_config(root / "corpus", self.quick)
            torch.manual_seed(SEED)
            tokenizer = synthetic_tokenizer()
            model = build_model(cfg, len(tokenizer), tokenizer).train()
            model.set_attn_implementation("sdpa")
            size = model.config.image_size
            processor = build_processor(cfg, size, model.config.patch_stride)
            rows = load_xvlm_dataset(cfg.dataset, "pretrain", "train", cache_dir=str(root / "cache"))
            data = build_task_data(cfg, processor, size, get_recipe("pretrain"), {("pretrain", "train"): rows})
            pipeline = self._map_rows(data, log) + self._streaming_rows(root / "corpus", data, cfg.shuffle_buffer, log)
            steps = self._model(model, data, min(repeats, 2 if self.quick else 3), log)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return {"case": self.describe(), "results": {}, "dataset": dataset, "image_size": size,
                "shuffle_buffer": cfg.shuffle_buffer, "pipeline": pipeline, "model": {"preset": cfg.model, **steps},
                "bottleneck": bottleneck(pipeline, steps), "torch_threads": torch.get_num_threads()}

    def compile_variants(self) -> list:
        return []


def bottleneck(pipeline: list[dict[str, Any]], model: dict[str, Any]) -> dict[str, Any]:
    """Per stream at the model's batch: the pipeline's time against the step's, and the worker counts that keep up."""
    out = {}
    for stream in ("image_text", "region"):
        step_s, step_ips = model[stream]["median_s"], model[stream]["items_per_s"]
        rows = [r for r in pipeline if r["stream"] == stream and r["batch"] == model["batch"]]
        main = next(r for r in rows if r["path"] == "streaming")
        per_process = next(r for r in rows if r["path"] == "map" and r["workers"] == 0)["images_per_s"]
        out[stream] = {
            "step_s": step_s, "step_images_per_s": step_ips, "streaming_batch_s": main["ms_per_batch"] / 1000,
            "streaming_fraction_of_step": main["ms_per_batch"] / 1000 / step_s,
            "streaming_share_of_loop": main["ms_per_batch"] / 1000 / (main["ms_per_batch"] / 1000 + step_s),
            "workers": {str(r["workers"]): {"images_per_s": r["images_per_s"], "headroom": r["images_per_s"] / step_ips,
                                            "bottleneck": r["images_per_s"] < step_ips}
                        for r in rows if r["path"] == "map"},
            "processes_to_keep_up": max(1, math.ceil(step_ips / per_process)),
        }
    return out


def data_pipeline_cases(quick: bool = False) -> list[Case]:
    return [DataPipelineCase(quick=quick)]
