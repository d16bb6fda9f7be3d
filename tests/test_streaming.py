"""``xvlm-train pretrain --streaming``: a streamed IterableDataset trains, resumes exactly (same examples, same
weights), and is split into disjoint parts across processes."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_xvlm.training.streaming import (
    StreamingBatches,
    StreamPosition,
    open_pretrain_stream,
)
from modeling_xvlm.training.train import TrainConfig, check_streaming_options, train

sys.path.insert(0, os.path.dirname(__file__))
from subprocess_env import offline_env  # noqa: E402


@pytest.fixture(scope="module")
def stream_dataset(tmp_path_factory) -> Path:
    from modeling_xvlm.data import SyntheticConfig, write_synthetic_dataset

    out = tmp_path_factory.mktemp("stream_data")
    write_synthetic_dataset(out, SyntheticConfig(num_train=16, num_validation=2, num_test=2), overwrite=True,
                            splits=("train",))
    return out


def _ids(rows) -> list:
    return [row["image_id"] for row in rows]


def _rows(source: Path, rank: int = 0, world: int = 1, buffer: int = 8, position=(0, 0)) -> StreamingBatches:
    stream = open_pretrain_stream(str(source), "train", rank, world, seed=3, shuffle_buffer=buffer, stream="image")
    return StreamingBatches(stream, collator=lambda rows: rows, batch_size=3, seed=3, stream="image", rank=rank,
                            position=position)


@pytest.mark.parametrize("buffer", [0, 8])
def test_resumed_stream_sees_the_same_examples(stream_dataset, buffer):
    """Batches after a saved position equal the uninterrupted stream's, across the end of a pass (16 rows, batches
    of 3: the 16th row is dropped and pass 1 is reshuffled)."""
    reference = _rows(stream_dataset, buffer=buffer)
    seen = [_ids(reference.next_rows()) for _ in range(8)]
    assert len({i for batch in seen[:5] for i in batch}) == 15  # pass 0: 5 batches of distinct rows
    assert reference.position == StreamPosition(1, 9)
    partial = _rows(stream_dataset, buffer=buffer)
    for _ in range(2):
        partial.next_rows()
    resumed = _rows(stream_dataset, buffer=buffer, position=partial.position)
    assert [_ids(resumed.next_rows()) for _ in range(6)] == seen[2:]
    if buffer:
        assert seen[5] != seen[0] or seen[6] != seen[1]  # the second pass is another order


def test_processes_read_disjoint_examples(stream_dataset):
    """split_dataset_by_node: the two processes' shuffled streams (1 Parquet shard: every 2nd example of the same
    shuffled order) are disjoint and together are the dataset; each process's batches come from its part."""
    parts = [set(_ids(open_pretrain_stream(str(stream_dataset), "train", rank, 2, seed=3, shuffle_buffer=8,
                                           stream="image"))) for rank in (0, 1)]
    assert parts[0].isdisjoint(parts[1]) and len(parts[0] | parts[1]) == 16
    for rank in (0, 1):
        batches = _rows(stream_dataset, rank, 2)
        assert set(_ids(batches.next_rows() + batches.next_rows())) <= parts[rank]


def _options(source: Path, out: Path, **changes) -> TrainConfig:
    options = {"task": "pretrain", "dataset": str(source), "tokenizer": "synthetic", "streaming": True, "shuffle_buffer": 8,
                   "max_steps": 4, "batch_size": 4, "iter_perc": 0.5, "region_max_images": 2, "region_batch_texts": 6,
                   "save_every": 2, "save_total_limit": 5, "eval_at_end": False, "save_final": False, "progress": False, "cpu": True,
                   "output_dir": str(out)}
    options.update(changes)
    return TrainConfig(**options)


def test_streaming_pretrain_trains_and_resumes_to_identical_weights(stream_dataset, tmp_path):
    torch.set_num_threads(1)
    summary = train(_options(stream_dataset, tmp_path / "ref"), log=lambda m: None)
    assert summary["steps"] == 4 and all(torch.isfinite(torch.tensor(v)) for v in summary["last_losses"].values())
    ckpts = tmp_path / "ref" / "checkpoints"
    state = (ckpts / "step-00000004" / "trainer_state.json").read_text()
    assert '"stream_positions"' in state and '"image"' in state
    step2, step4 = load_file(ckpts / "step-00000002" / "model.safetensors"), load_file(
        ckpts / "step-00000004" / "model.safetensors")
    assert any(not torch.equal(step2[k], step4[k]) for k in step4)  # it trained

    # the second run: stop at step 2 (the checkpoint), then resume to step 4
    run = tmp_path / "run"
    train(_options(stream_dataset, run, max_steps=4, save_every=2), log=lambda m: None)
    (run / "checkpoints" / "latest").write_text("step-00000002\n")
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    messages: list[str] = []
    train(_options(stream_dataset, run, resume="latest"), log=messages.append)
    assert any("at step 2" in m for m in messages)
    resumed = load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(resumed[k], step4[k]) for k in step4)


@pytest.mark.parametrize("change, message", [
    ({"max_steps": None}, "--max-steps"),
    ({"num_workers": 2}, "--num-workers 0"),
    ({"task": "retrieval"}, "pretrain task"),
    ({"max_train_examples": 4}, "--max-train-examples"),
    ({"shuffle_buffer": -1}, "--shuffle-buffer"),
])
def test_streaming_refuses_options_that_need_a_length(stream_dataset, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        check_streaming_options(_options(stream_dataset, tmp_path, **change))


# ----------------------------------------------------------------------------------------------------------------
# Two CPU processes (accelerate's launcher, gloo): killed with SIGKILL after a checkpoint, resumed, identical weights
# ----------------------------------------------------------------------------------------------------------------

# Every process SIGKILLs itself at the end of step `at` (a callback defined here, in the test); -1: never.
_RUNNER = """
import os, signal, sys
from modeling_xvlm.training.train import TrainingCallback, build_parser, config_from_args, train

at = int(sys.argv[1])


class Kill(TrainingCallback):
    def on_step_end(self, step):
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)


train(config_from_args(build_parser().parse_args(sys.argv[2:])), callbacks=[Kill()])
"""


def _launch(runner: Path, dataset: Path, out: Path, kill_at: int = -1, resume: bool = False):
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(runner), str(kill_at),
        "pretrain", "--streaming", "--dataset", str(dataset), "--tokenizer", "synthetic", "--max-steps", "6",
        "--batch-size", "2", "--shuffle-buffer", "4", "--iter-perc", "0.5", "--region-max-images", "2",
        "--region-batch-texts", "4", "--save-every", "2", "--save-total-limit", "5", "--no-eval-at-end", "--no-save-final", "--no-progress",
        "--output-dir", str(out),
    ] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=offline_env(), capture_output=True, text=True, timeout=300, cwd=out.parent)


def test_two_process_streaming_run_killed_and_resumed_gives_identical_weights(stream_dataset, tmp_path):
    """2 processes x 8 rows, batches of 2 per process: 6 steps cross a pass of the stream. Killed after step 3
    (the step-2 checkpoint is the newest), resumed: the step-6 weights equal the uninterrupted run's bit for bit."""
    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER)
    reference = _launch(runner, stream_dataset, tmp_path / "reference")
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-3000:]
    killed = _launch(runner, stream_dataset, tmp_path / "run", kill_at=3)
    assert killed.returncode != 0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not (checkpoints / "step-00000004").exists() and (checkpoints / "step-00000002").is_dir()
    resumed = _launch(runner, stream_dataset, tmp_path / "run", resume=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    state = (checkpoints / "step-00000006" / "trainer_state.json").read_text()
    assert '"world_size": 2' in state and '"stream_positions"' in state
    expected = load_file(tmp_path / "reference" / "checkpoints" / "step-00000006" / "model.safetensors")
    final = load_file(checkpoints / "step-00000006" / "model.safetensors")
    assert expected.keys() == final.keys()
    assert all(torch.equal(expected[k], final[k]) for k in expected)
    start = load_file(checkpoints / "step-00000002" / "model.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in final)  # it trained after the resume


def test_converted_pretraining_shards_stream_with_load_dataset(tmp_path):
    """`convert_official` streams the official JSON lines into bounded Parquet shards; `load_dataset(folder,
    streaming=True)` reads them back in order, and two processes' streams split them without overlap."""
    import io
    import json

    import datasets
    from PIL import Image

    from modeling_xvlm.data.official import convert_official

    (tmp_path / "images").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buffer, format="PNG")
    (tmp_path / "images" / "red.png").write_bytes(buffer.getvalue())
    lines = [{"caption": f"caption number {i}", "image_rpath": "red.png"} for i in range(250)]
    (tmp_path / "corpus.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    convert_official(out, tmp_path / "images", pretrain_text=[tmp_path / "corpus.json"], max_shard_bytes=1)
    shards = sorted(p.name for p in (out / "pretrain").glob("train-*.parquet"))
    assert shards == [f"train-0000{i}-of-00003.parquet" for i in range(3)]  # 100-row groups, one per shard

    streamed = datasets.load_dataset(str(out), "pretrain", split="train", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["captions"] for row in streamed] == [[line["caption"]] for line in lines]
    parts = [[row["captions"][0] for row in open_pretrain_stream(str(out), "train", rank, 2, 0, 0, "image")]
             for rank in (0, 1)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(x["caption"] for x in lines)


@pytest.mark.parametrize("stream, option", [("image", "--batch-size"), ("region", "--region-max-images")])
def test_a_stream_shorter_than_one_batch_names_the_option_to_lower(stream_dataset, stream, option):
    rows = open_pretrain_stream(str(stream_dataset), "train", 0, 1, seed=3, shuffle_buffer=0, stream=stream)
    batches = StreamingBatches(rows, collator=lambda r: r, batch_size=48, seed=3, stream=stream, rank=0)
    with pytest.raises(ValueError, match=f"fewer than 48 examples per pass.*lower {option}"):
        next(batches)
