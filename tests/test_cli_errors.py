"""Every command-line tool turns bad input files into one line on stderr and exit status 2
(`modeling_xvlm.cli_errors`); ``XVLM_DEBUG=1`` gives the traceback instead."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_xvlm.cli_errors import cli_errors, ensure_writable_dir
from modeling_xvlm.conversion.__main__ import main as xvlm_convert
from modeling_xvlm.data.cli import main as xvlm_data
from modeling_xvlm.training import evaluate as xvlm_eval
from modeling_xvlm.training.train import main as xvlm_train

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, prog: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def bad_checkpoints(tmp_path) -> dict[str, Path]:
    good = tmp_path / "good.pth"
    torch.save({"model": {"x": torch.zeros(3)}, "config": {}}, good)
    files = {"random_bytes": tmp_path / "random.pth", "truncated": tmp_path / "truncated.pth",
             "empty": tmp_path / "empty.pth", "not_a_dict": tmp_path / "list.pth",
             "bad_safetensors": tmp_path / "bad.safetensors"}
    files["random_bytes"].write_bytes(bytes(__import__("random").Random(0).randrange(256) for _ in range(4096)))
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["empty"].write_bytes(b"")
    torch.save([torch.zeros(2), 1], files["not_a_dict"])
    files["bad_safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return files


@pytest.mark.parametrize("kind", ["random_bytes", "truncated", "empty", "not_a_dict", "bad_safetensors"])
def test_xvlm_convert_reports_bad_checkpoints_in_one_line(bad_checkpoints, kind, tmp_path, capsys):
    out = tmp_path / "out"
    assert xvlm_convert(["--checkpoint", str(bad_checkpoints[kind]), "--task", "retrieval", "--output", str(out),
                         "--no-tokenizer"]) == 2
    err = _one_line_error(capsys, "xvlm-convert", str(bad_checkpoints[kind].name))
    expected = "must be a dict" if kind == "not_a_dict" else "is not a readable checkpoint"
    assert expected in err
    assert "pickled Python objects" not in err  # damaged, not dangerous: not reported as a refused pickle
    assert not out.exists()


def test_xvlm_convert_console_script_exits_2_and_debug_gives_the_traceback(bad_checkpoints, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "modeling_xvlm.conversion", "--checkpoint", str(bad_checkpoints["random_bytes"]),
           "--task", "retrieval", "--output", str(tmp_path / "out"), "--no-tokenizer"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    debug = subprocess.run(cmd, env=dict(env, XVLM_DEBUG="1"), capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CorruptCheckpointError" in debug.stderr


def _refcoco_inputs(tmp_path: Path, refs_bytes: bytes) -> list[str]:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "refcoco+_test.json").write_text(json.dumps([{"image": "a.jpg", "text": "a box", "ref_id": 1}]))
    (tmp_path / "instances.json").write_text(json.dumps({"annotations": [{"id": 5, "bbox": [1, 1, 4, 4]}]}))
    (tmp_path / "refs.p").write_bytes(refs_bytes)
    return ["convert-official", "--out", str(tmp_path / "out"), "--image-root", str(tmp_path / "images"),
            "--grounding-test", str(tmp_path / "refcoco+_test.json"), "--refcoco-refs", str(tmp_path / "refs.p"),
            "--refcoco-instances", str(tmp_path / "instances.json")]


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_xvlm_data_refuses_a_refcoco_pickle_with_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    argv = _refcoco_inputs(tmp_path, pickle.dumps([{"ann_id": 5, "ref_id": 1, "x": _RunsCode(str(marker))}]))
    assert xvlm_data(argv) == 2
    _one_line_error(capsys, "xvlm-data convert-official", "refusing to load", "RefCOCO refs pickle")
    assert not marker.exists()


@pytest.mark.parametrize("refs", [b"B\xff\xff\xff\xff\xff\xff\xff\x7f" + bytes(8),  # BINBYTES: OverflowError
                                  pickle.dumps([{"ann_id": 5}])[:-3], pickle.dumps({"a": 1})])
def test_xvlm_data_reports_unreadable_refcoco_refs(tmp_path, refs, capsys):
    assert xvlm_data(_refcoco_inputs(tmp_path, refs)) == 2
    err = _one_line_error(capsys, "xvlm-data convert-official", "refs.p")
    assert "refusing" not in err


def test_random_bytes_as_a_checkpoint_are_one_clear_error(tmp_path):
    from modeling_xvlm.conversion.safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_official_checkpoint

    rng = __import__("random").Random(1)
    for i in range(100):
        path = tmp_path / f"{i}.pth"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(256)))
        with pytest.raises((CorruptCheckpointError, UnsafeCheckpointError)):
            load_official_checkpoint(path)


def test_random_bytes_as_refcoco_refs_are_one_clear_error(tmp_path):
    from modeling_xvlm.data.official import load_refcoco_boxes

    (tmp_path / "instances.json").write_text(json.dumps({"annotations": []}))
    rng = __import__("random").Random(0)
    for i in range(200):  # whatever the bytes, a ValueError or the refusal, never another exception
        (tmp_path / "refs.p").write_bytes(bytes(rng.randrange(256) for _ in range(64)))
        try:
            load_refcoco_boxes(tmp_path / "refs.p", tmp_path / "instances.json")
        except (ValueError, pickle.UnpicklingError):
            pass


def test_xvlm_train_reports_a_corrupt_resume_checkpoint(tmp_path, capsys):
    from modeling_xvlm.data import SyntheticConfig, write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(num_train=8, num_validation=2, num_test=2), overwrite=True)
    argv = ["pretrain", "--dataset", str(data), "--tokenizer", "synthetic", "--max-steps", "2", "--batch-size", "4",
            "--iter-perc", "0", "--save-every", "2", "--no-eval-at-end", "--no-save-final", "--no-progress", "--cpu",
            "--output-dir", str(tmp_path / "run")]
    torch.set_num_threads(1)
    assert xvlm_train(argv) == 0
    capsys.readouterr()
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("[1, 2")
    assert xvlm_train(argv + ["--resume"]) == 2
    _one_line_error(capsys, "xvlm-train", "no checkpoint under", "verifies", "trainer_state.json")
    assert xvlm_train(argv + ["--resume", str(data)]) == 2
    _one_line_error(capsys, "xvlm-train", "not a checkpoint folder")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert xvlm_train(argv[:-1] + [str(blocker)]) == 2
    _one_line_error(capsys, "xvlm-train", "exists and is not a folder")


def test_xvlm_eval_reports_a_corrupt_model_and_an_unwritable_output(tmp_path, capsys):
    from modeling_xvlm import XVLMConfig, XVLMForRetrieval
    from modeling_xvlm.data import SyntheticConfig, synthetic_tokenizer, write_synthetic_dataset
    from modeling_xvlm.processing import XVLMImageProcessor, XVLMProcessor

    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(num_train=2, num_validation=2, num_test=2), overwrite=True)
    tokenizer = synthetic_tokenizer()
    model_dir = tmp_path / "model"
    XVLMForRetrieval(XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(tokenizer)})).save_pretrained(
        model_dir)
    XVLMProcessor(XVLMImageProcessor(size={"height": 64, "width": 64}, patch_size=8), tokenizer).save_pretrained(
        model_dir)
    argv = ["retrieval", "--model", str(model_dir), "--dataset", str(data), "--k-test", "2"]
    capsys.readouterr()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert xvlm_eval.main(argv + ["--output", str(blocker / "metrics.json")]) == 2  # before any evaluation
    _one_line_error(capsys, "xvlm-eval", "the --output folder", "exists and is not a folder")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert xvlm_eval.main(argv) == 2
    _one_line_error(capsys, "xvlm-eval")


def test_cli_errors_lets_programming_errors_through(monkeypatch, capsys):
    @cli_errors("tool")
    def broken() -> int:
        raise KeyError("a bug, not bad input")

    @cli_errors("tool")
    def refused() -> int:
        raise SystemExit("  the message\n on two lines ")

    with pytest.raises(KeyError):
        broken()
    assert refused() == 2
    assert capsys.readouterr().err == "tool: error: the message on two lines\n"
    monkeypatch.setenv("XVLM_DEBUG", "1")
    with pytest.raises(SystemExit):
        refused()


def test_ensure_writable_dir_creates_and_probes(tmp_path):
    ensure_writable_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match="output folder .* exists and is not a folder"):
        ensure_writable_dir(tmp_path / "f")
    with pytest.raises((PermissionError, NotADirectoryError), match="checkpoint folder"):
        ensure_writable_dir(tmp_path / "f" / "sub", "checkpoint folder")


@pytest.mark.parametrize("command", ["xvlm-train", "xvlm-eval"])
def test_a_missing_model_folder_is_named_not_taken_for_a_bad_repo_id(command, tmp_path, capsys):
    from modeling_xvlm.training.evaluate import main as xvlm_eval
    from modeling_xvlm.training.train import main as xvlm_train

    missing = str(tmp_path / "no-such-model")
    main = xvlm_train if command == "xvlm-train" else xvlm_eval
    assert main(["retrieval", "--model", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{command}: error: --model {missing!r}: no such folder (a Hub id is written 'org/name')"


def test_require_model_source_lets_presets_and_hub_ids_through():
    from modeling_xvlm.cli_errors import require_model_source

    for value in ("tiny", "base", "org/xvlm-base", "bert-base-uncased"):
        require_model_source(value)
    for value in ("./nope", "../nope", "~/nope-xvlm", "/abs/nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            require_model_source(value)
