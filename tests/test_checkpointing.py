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

sys.path.insert(0, os.path.dirname(__file__))
from subprocess_env import offline_env  # noqa: E402


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


def _run(tiny_dataset: Path, out: Path, fault: str | None = None, resume: bool = False,
         threads: int = 1, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = offline_env(threads)
    cmd = [
        sys.executable, "-c", _RUNNER, fault or "-", "pretrain", "--dataset", str(tiny_dataset),
        "--tokenizer", "synthetic", "--max-steps", "6", "--batch-size", "4", "--iter-perc", "0.5",
        "--region-max-images", "2", "--region-batch-texts", "6", "--save-every", "2", "--save-total-limit", "5",
        "--no-eval-at-end", "--no-save-final", "--no-progress", "--cpu", "--output-dir", str(out),
    ]
    cmd += list(extra)
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


# ----------------------------------------------------------------------------------------------------------------
# Manifest: a changed, truncated or missing file is never loaded; resume falls back to the newest that verifies
# ----------------------------------------------------------------------------------------------------------------


def _flip_bytes(path: Path, offset_from_end: int = 64, count: int = 4) -> None:
    """Change ``count`` bytes inside the tensor data of ``path`` (same size: only the hash can tell)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_names_every_file_and_catches_changes(tmp_path):
    from modeling_xvlm.training.checkpointing import MANIFEST_FILE, CheckpointError, verify_checkpoint

    model, optimizer, scheduler = _model_and_optim()
    path = save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, scheduler, {})
    manifest = __import__("json").loads((path / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {p.name for p in path.iterdir() if p.name != MANIFEST_FILE}
    weights = path / "model.safetensors"
    assert manifest["files"]["model.safetensors"]["size"] == weights.stat().st_size
    verify_checkpoint(path)  # a fresh checkpoint verifies

    _flip_bytes(weights)
    with pytest.raises(CheckpointError, match=r"model.safetensors has changed \(sha256"):
        verify_checkpoint(path)
    fresh, fresh_optimizer, fresh_scheduler = _model_and_optim()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing was loaded

    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors has 100 bytes, the manifest says"):
        verify_checkpoint(path)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        verify_checkpoint(path)
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid checkpoint manifest"):
        verify_checkpoint(path)
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        verify_checkpoint(path)


def test_newest_valid_checkpoint_falls_back_and_says_so(tmp_path):
    from modeling_xvlm.training.checkpointing import CheckpointError, newest_valid_checkpoint

    model, optimizer, scheduler = _model_and_optim()
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        save_checkpoint(root, step, model, optimizer, scheduler, {}, total_limit=5)
    messages: list[str] = []
    assert newest_valid_checkpoint(root, messages.append).name == "step-00000006" and messages == []

    _flip_bytes(root / "step-00000006" / "model.safetensors")
    (root / "step-00000004" / "scheduler.pt").write_bytes(b"")
    assert newest_valid_checkpoint(root, messages.append).name == "step-00000002"
    assert messages[0].startswith("skipping checkpoint step-00000006") and "sha256" in messages[0]
    assert messages[1].startswith("skipping checkpoint step-00000004") and "scheduler.pt has 0 bytes" in messages[1]
    assert messages[2] == "falling back to step-00000002, the newest checkpoint that verifies"

    _flip_bytes(root / "step-00000002" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        newest_valid_checkpoint(root, messages.append)
    assert newest_valid_checkpoint(tmp_path / "empty", messages.append) is None


def _train_in_process(tiny_dataset: Path, out: Path, **changes):
    from modeling_xvlm.training.train import TrainConfig, train

    options = dict(task="pretrain", dataset=str(tiny_dataset), tokenizer="synthetic", max_steps=4, batch_size=4,
                   iter_perc=0.0, save_every=2, save_total_limit=5, eval_at_end=False, save_final=False,
                   progress=False, cpu=True, output_dir=str(out))
    options.update(changes)
    messages: list[str] = []
    torch.set_num_threads(1)
    summary = train(TrainConfig(**options), log=messages.append)
    return summary, messages


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_resume_falls_back_past_a_corrupted_latest_checkpoint_to_the_same_weights(tiny_dataset, tmp_path):
    _train_in_process(tiny_dataset, tmp_path / "reference")
    reference = _weights(tmp_path / "reference" / "checkpoints" / "step-00000004")

    run = tmp_path / "run"
    _train_in_process(tiny_dataset, run)  # checkpoints at steps 2 and 4
    _flip_bytes(run / "checkpoints" / "step-00000004" / "model.safetensors")  # 4 bytes of the latest checkpoint
    summary, messages = _train_in_process(tiny_dataset, run, resume="latest")
    said = "\n".join(messages)
    assert "skipping checkpoint step-00000004" in said and "falling back to step-00000002" in said
    assert "at step 2" in said and summary["steps"] == 4
    resumed = _weights(run / "checkpoints" / "step-00000004")  # rewritten from step 2: the same run again
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert all(torch.isfinite(v).all() for v in resumed.values())


def test_resume_refuses_a_changed_configuration_unless_allowed(tiny_dataset, tmp_path):
    from modeling_xvlm.training.checkpointing import CheckpointError
    from modeling_xvlm.training.train import resume_config_differences

    run = tmp_path / "run"
    _train_in_process(tiny_dataset, run)
    with pytest.raises(CheckpointError) as refused:
        _train_in_process(tiny_dataset, run, resume="latest", lr=2e-3, seed=7, batch_size=2)
    message = str(refused.value)
    assert "batch_size: 4 -> 2" in message and "lr: None -> 0.002" in message and "seed: 42 -> 7" in message
    assert "--allow-config-change" in message
    assert "max_steps: 4 -> 8" in str(pytest.raises(CheckpointError, _train_in_process, tiny_dataset, run,
                                                    resume="latest", max_steps=8).value)  # the schedule's length
    # Options that only change where files go or what is logged / evaluated may change.
    _, messages = _train_in_process(tiny_dataset, run, resume="latest", log_every=1, eval_every=5)
    assert any("at step 4" in m for m in messages)
    summary, messages = _train_in_process(tiny_dataset, run, resume="latest", lr=2e-3, allow_config_change=True)
    assert summary["steps"] == 4
    assert any(m.startswith("resuming with a changed configuration") and "lr: None -> 0.002" in m for m in messages)
    assert resume_config_differences({"seed": 1, "output_dir": "a"}, {"seed": 1, "output_dir": "b"}) == []
    assert resume_config_differences({}, {"lr": 0.1}) == ["lr: unset -> 0.1"]


def test_training_checks_the_output_folder_before_the_first_step(tiny_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        _train_in_process(tiny_dataset, blocker, max_steps=1000)  # fails at once, not after 1000 steps
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # root writes into read-only folders: then a folder the kernel refuses (sysfs) stands in.
    target = locked / "out" if os.geteuid() != 0 else Path("/sys/xvlm-unwritable-test/out")
    try:
        for save_every in (2, 0):  # checkpoints on, and --save-every 0 (only the final save would fail)
            with pytest.raises(PermissionError, match="is not writable"):
                _train_in_process(tiny_dataset, target, max_steps=1000, save_every=save_every, save_final=True)
    finally:
        locked.chmod(0o700)


def test_resume_with_two_threads_agrees_to_float_tolerance(tiny_dataset, tmp_path):
    """With more than one thread, some CPU kernels (embedding and index backward passes, reductions split over
    threads) add in a thread-dependent order, so two runs, resumed or not, agree to float rounding only: the
    documented tolerance, not bit equality (the one-thread case above is bit-exact)."""
    options = dict(threads=2, extra=("--lr", "1e-3", "--warmup", "0"))
    reference = _run(tiny_dataset, tmp_path / "reference", **options)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "interrupted"
    assert _run(tiny_dataset, run, fault="kill_after_step=3", **options).returncode == -9
    resumed = _run(tiny_dataset, run, resume=True, **options)
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr[-3000:]
    ref = _weights(tmp_path / "reference" / "checkpoints" / "step-00000006")
    out = _weights(run / "checkpoints" / "step-00000006")
    start = _weights(run / "checkpoints" / "step-00000002")
    gap = max(float((out[k] - ref[k]).abs().max()) for k in ref)
    trained = max(float((ref[k] - start[k]).abs().max()) for k in ref)
    print(f"two threads: resumed vs uninterrupted {gap:.3g}, steps 2 -> 6 moved the weights by {trained:.3g}")
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    assert trained > 1e-3  # the tolerance is far below what training changes
