"""Atomic checkpoints and exact resume (a SIGKILLed and resumed run ends with the uninterrupted run's weights)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling_xvlm import XVLMConfig, XVLMForRetrieval
from modeling_xvlm.training.checkpointing import (
    atomic_write_text,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from modeling_xvlm.training.recipe import create_optimizer, create_scheduler

REPO = Path(__file__).resolve().parents[1]


def _model_and_optim():
    model = XVLMForRetrieval(XVLMConfig.from_preset("tiny"))
    optimizer = create_optimizer(model, lr=1e-3)
    scheduler = create_scheduler(optimizer, 10, 2)
    model(pixel_values=torch.randn(2, 3, 64, 64), input_ids=torch.randint(5, 50, (2, 6)), return_loss=True).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(), torch.rand(())
    restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_save_load_round_trip(tmp_path):
    model, optimizer, scheduler = _model_and_optim()
    root = tmp_path / "checkpoints"
    path = save_checkpoint(root, 1, model, optimizer, scheduler, {"region_micro_steps": 3})
    assert latest_checkpoint(root) == path and (root / "latest").read_text().strip() == "step-00000001"
    expected = torch.rand(3)

    fresh, fresh_optimizer, fresh_scheduler = _model_and_optim()
    state = load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler)
    assert state["step"] == 1 and state["region_micro_steps"] == 3
    assert torch.equal(torch.rand(3), expected)  # RNG restored
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    a, b = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    model, optimizer, scheduler = _model_and_optim()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, model, optimizer, scheduler, {})

    def crash(where):
        raise KeyboardInterrupt(where)

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 4, model, optimizer, scheduler, {}, stage_hook=crash)
    assert latest_checkpoint(root).name == "step-00000002"  # the half-written step 4 is invisible
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002"]
    save_checkpoint(root, 6, model, optimizer, scheduler, {}, total_limit=1)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000006"]
    assert not list(root.glob(".tmp-*"))  # stale temporary folders are cleaned up
    atomic_write_text(tmp_path / "x.txt", "hello")
    assert (tmp_path / "x.txt").read_text() == "hello"


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    from modeling_xvlm.data import SyntheticConfig, write_synthetic_dataset

    out = tmp_path_factory.mktemp("ckpt_data")
    write_synthetic_dataset(out, SyntheticConfig(num_train=40, num_validation=4, num_test=4), overwrite=True)
    return out


# The run, in a subprocess; `fault` ("kill_after_step=N" / "kill_mid_save=N") SIGKILLs it through a training
# callback defined here, in the test, not in the training loop.
_RUNNER = """
import os, signal, sys
from modeling_xvlm.training.train import TrainingCallback, build_parser, config_from_args, train

kind, _, at = (sys.argv[1] if sys.argv[1] != "-" else "none=-1").partition("=")
at = int(at)


class Kill(TrainingCallback):
    def on_step_end(self, step):
        if kind == "kill_after_step" and step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint_stage(self, step, stage):
        if kind == "kill_mid_save" and step == at and stage == "mid_save":
            os.kill(os.getpid(), signal.SIGKILL)


train(config_from_args(build_parser().parse_args(sys.argv[2:])), callbacks=[Kill()])
"""


def _run(tiny_dataset: Path, out: Path, fault: str | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-c", _RUNNER, fault or "-", "pretrain", "--dataset", str(tiny_dataset),
        "--tokenizer", "synthetic", "--max-steps", "6", "--batch-size", "4", "--iter-perc", "0.5",
        "--region-max-images", "2", "--region-batch-texts", "6", "--save-every", "2", "--save-total-limit", "5",
        "--no-eval-at-end", "--no-save-final", "--no-progress", "--cpu", "--output-dir", str(out),
    ]
    if resume:
        cmd.append("--resume")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_and_resume_matches_uninterrupted_run(tiny_dataset, tmp_path):
    """Pre-training with random region steps, MLM masking, ITM negative sampling and dropout: killed with SIGKILL
    in the middle of writing the step-4 checkpoint, resumed (from step 2), killed again after step 5, resumed
    (from step 4): the final weights and optimizer state equal those of an uninterrupted run bit for bit."""
    reference = _run(tiny_dataset, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "interrupted"
    first = _run(tiny_dataset, run, fault="kill_mid_save=4")
    assert first.returncode == -9, first.stderr[-3000:]
    assert latest_checkpoint(run / "checkpoints").name == "step-00000002"
    second = _run(tiny_dataset, run, fault="kill_after_step=5", resume=True)
    assert second.returncode == -9, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    assert latest_checkpoint(run / "checkpoints").name == "step-00000004"
    third = _run(tiny_dataset, run, resume=True)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "at step 4" in third.stdout

    final_ref = tmp_path / "reference" / "checkpoints" / "step-00000006"
    final_run = run / "checkpoints" / "step-00000006"
    ref_weights, run_weights = load_file(final_ref / "model.safetensors"), load_file(final_run / "model.safetensors")
    assert ref_weights.keys() == run_weights.keys()
    for key in ref_weights:
        assert torch.equal(ref_weights[key], run_weights[key]), key
    ref_opt = torch.load(final_ref / "optimizer.pt", weights_only=True)["state"]
    run_opt = torch.load(final_run / "optimizer.pt", weights_only=True)["state"]
    for key in ref_opt:
        assert torch.equal(ref_opt[key]["exp_avg_sq"], run_opt[key]["exp_avg_sq"])
    # The initial weights differ from the final ones (the run did train).
    assert any(not torch.equal(load_file(run / "checkpoints" / "step-00000002" / "model.safetensors")[k], v)
               for k, v in run_weights.items())
