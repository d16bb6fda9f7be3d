"""`xvlm-convert` as a newcomer runs it (issue #17): no `--task` (the task is detected from the keys of every official
model class), the default tokenizer (`bert-base-uncased`: a local folder, else the Hub, else one clear error) and
`--push-to-hub` (huggingface_hub's `create_repo` + `upload_folder`; offline it fails before any work)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch
import transformers
from huggingface_hub import HfApi

sys.path.insert(0, os.path.dirname(__file__))

from official_format import official_state_dict, official_task_files, tiny_arch  # noqa: E402

from modeling_xvlm.conversion import ConversionError, convert_checkpoint, detect_task  # noqa: E402
from modeling_xvlm.conversion.__main__ import main  # noqa: E402
from modeling_xvlm.conversion.official_checkpoints import OFFICIAL_CHECKPOINTS  # noqa: E402
from modeling_xvlm.conversion.convert_official import (  # noqa: E402
    HEAD_CLASS_NAMES,
    DEFAULT_TOKENIZER,
    load_tokenizer,
    push_folder,
)
from modeling_xvlm.tasks import TASKS as MODEL_TASKS  # noqa: E402

#: Official model file -> what the official-format state dict of `official_format` is named, the task detected and
#: the task YAML the conversion reads (VQA: `num_dec_layers`, asserted equal to the fusion layers officially).
OFFICIAL_MODELS = {
    "models/model_pretrain.py": ("pretrain", "Pretrain.yaml", ""),
    "models/model_retrieval.py": ("retrieval", "Retrieval_coco.yaml", ""),
    "models/model_bbox.py": ("grounding", "Grounding_bbox.yaml", ""),
    "models/model_vqa.py": ("vqa", "VQA.yaml", "num_dec_layers: 2\n"),
    "models/model_nlvr.py": ("nlvr2", "NLVR.yaml", ""),
    "models/model_nlvr_pretrain.py": ("nlvr2-pretrain", "NLVR_pretrain.yaml", ""),
    "models/model_captioning.py": ("captioning", "Captioning.yaml", ""),
}


def test_every_task_of_the_package_is_detected():
    assert sorted(task for task, _, _ in OFFICIAL_MODELS.values()) == sorted(MODEL_TASKS)


def _vocab_folder(tmp_path, tiny_vocab, name: str = "bert"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(sorted(tiny_vocab, key=tiny_vocab.get)) + "\n")
    return folder


@pytest.mark.parametrize("official_model", list(OFFICIAL_MODELS))
def test_cli_without_task_detects_and_writes_a_loadable_folder(official_model, tmp_path, tiny_vocab, capsys):
    task, yaml_name, extra = OFFICIAL_MODELS[official_model]
    arch = tiny_arch(vocab=len(tiny_vocab))
    sd = official_state_dict(arch, task, seed=3)
    checkpoint = tmp_path / "checkpoint_best.pth"
    torch.save({"model": sd}, checkpoint)
    yaml_path = official_task_files(tmp_path, arch, name=yaml_name, extra=extra)
    out = tmp_path / "converted"

    code = main(["--checkpoint", str(checkpoint), "--output", str(out), "--config", yaml_path,
                 "--tokenizer", str(_vocab_folder(tmp_path, tiny_vocab))])

    assert code == 0
    printed = capsys.readouterr().out
    head = HEAD_CLASS_NAMES[task]
    detected = [line for line in printed.splitlines() if line.startswith("Detected task:")]
    assert len(detected) == 1 and detected[0].startswith(f"Detected task: {task} -> {head} (the checkpoint has ")
    assert f"({official_model}" in detected[0]  # the evidence names the official model file
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [head]
    assert head in (out / "README.md").read_text()
    row = MODEL_TASKS[task]
    model = getattr(transformers, row.auto_class).from_pretrained(out)
    assert type(model).__name__ == head
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "XVLMProcessor"
    assert processor.tokenizer.convert_tokens_to_ids("[SEP]") == tiny_vocab["[SEP]"]


def test_weakly_supervised_grounding_checkpoint_is_a_retrieval_model():
    """Official `Grounding.py` fine-tunes `model_retrieval.XVLM`: its checkpoint has the retrieval keys."""
    sd = official_state_dict(tiny_arch(), "retrieval", device="meta")
    assert detect_task(sd) == "retrieval"


def test_unrecognisable_checkpoint_is_one_line_asking_for_task(tmp_path, capsys):
    sd = {k: v for k, v in official_state_dict(tiny_arch(), "retrieval").items() if not k.startswith("itm_head.")}
    checkpoint = tmp_path / "vision_and_text_only.pth"
    torch.save({"model": sd}, checkpoint)
    code = main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--no-tokenizer"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "Cannot tell which official model" in err and "pass --task explicitly" in err


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer: local folder, else the Hub, else a clear error
# ----------------------------------------------------------------------------------------------------------------


def test_default_tokenizer_is_a_local_folder_of_that_name_first(tmp_path, tiny_vocab, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _vocab_folder(tmp_path, tiny_vocab, DEFAULT_TOKENIZER)
    hub = mock.Mock(side_effect=AssertionError("the Hub must not be asked"))
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER, from_hub=hub)
    assert tokenizer.vocab_size == len(tiny_vocab) and not hub.called


@pytest.mark.parametrize("offline", [False, True])
def test_default_tokenizer_from_the_hub_only_from_the_cache_offline(offline, tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local bert-base-uncased folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    hub = mock.Mock(return_value=tiny_tokenizer)
    assert load_tokenizer(DEFAULT_TOKENIZER, from_hub=hub) is tiny_tokenizer
    hub.assert_called_once_with(DEFAULT_TOKENIZER, local_files_only=offline)


def test_tokenizer_error_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub = mock.Mock(side_effect=OSError("We couldn't connect to 'https://huggingface.co'\nmore detail"))
    with pytest.raises(ConversionError) as caught:
        load_tokenizer("bert-base-uncased", from_hub=hub)
    message = str(caught.value)
    assert "\n" not in message
    assert f"tried the local folder {tmp_path / 'bert-base-uncased'}" in message
    assert "the Hub repo bert-base-uncased (loading it from the Hub failed (OSError: We couldn't connect" in message
    assert "--no-tokenizer" in message


def test_a_tokenizer_without_vocabulary_is_refused(tmp_path, monkeypatch):
    """transformers 5 builds a tokenizer of the special tokens alone when no vocabulary file is found."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    specials_only = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                                 "[MASK]"])})
    with pytest.raises(ConversionError, match=r"the Hub is offline \(HF_HUB_OFFLINE=1\) and the Hugging Face cache"):
        load_tokenizer(DEFAULT_TOKENIZER, from_hub=mock.Mock(return_value=specials_only))


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tiny_tokenizer):
    sd = official_state_dict(tiny_arch(vocab=len(tiny_tokenizer) - 4), "grounding", seed=4)
    with pytest.raises(ConversionError, match=f"The tokenizer has {len(tiny_tokenizer)} tokens but the checkpoint's "
                       f"word embeddings only {len(tiny_tokenizer) - 4}"):
        convert_checkpoint({"model": sd}, tokenizer=tiny_tokenizer, log=None)


def test_cli_default_tokenizer_offline_without_cache_is_one_line(tmp_path):
    """The real command, offline, with an empty Hugging Face cache and no local folder: one line naming both."""
    sd = official_state_dict(tiny_arch(), "grounding", seed=1)
    checkpoint = tmp_path / "checkpoint_best.pth"
    torch.save({"model": sd}, checkpoint)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run(
        [sys.executable, "-m", "modeling_xvlm.conversion", "--checkpoint", str(checkpoint), "--output",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xvlm-convert: error: --tokenizer 'bert-base-uncased': ")
    assert f"tried the local folder {tmp_path / 'bert-base-uncased'}" in lines[0]
    assert "the Hub is offline (HF_HUB_OFFLINE=1) and the Hugging Face cache has no copy" in lines[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# --push-to-hub
# ----------------------------------------------------------------------------------------------------------------


def _fake_api() -> mock.Mock:
    """An `HfApi` stand-in with the real methods' signatures (calls with wrong arguments fail)."""
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.return_value = "https://huggingface.co/someone/xvlm-tiny"
    return api


def test_push_uploads_the_written_folder_with_create_repo_and_upload_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    sd = official_state_dict(tiny_arch(), "grounding", seed=2)
    api = _fake_api()
    out = tmp_path / "converted"
    convert_checkpoint({"model": sd}, out, push_to_hub="someone/xvlm-tiny", hub_api=api)
    api.create_repo.assert_called_once_with("someone/xvlm-tiny", repo_type="model", exist_ok=True, private=None)
    assert api.upload_folder.call_count == 1
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "someone/xvlm-tiny" and kwargs["repo_type"] == "model"
    assert kwargs["folder_path"] == os.fspath(out)
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(out))
    assert "repo_id: someone/xvlm-tiny" in (out / "README.md").read_text() or "someone/xvlm-tiny" in (
        out / "README.md").read_text()
    assert "Pushed " in capsys.readouterr().out
    assert [name for name, _, _ in api.method_calls] == ["create_repo", "upload_folder"]


def test_push_folder_is_the_real_hf_api_when_none_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with mock.patch.object(HfApi, "create_repo", autospec=True, return_value="url") as create, \
            mock.patch.object(HfApi, "upload_folder", autospec=True) as upload:
        assert push_folder(tmp_path, "someone/repo") == "url"
    assert isinstance(create.call_args.args[0], HfApi) and upload.call_args.kwargs["folder_path"] == os.fspath(tmp_path)


def test_push_offline_fails_at_once_before_reading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    api = _fake_api()
    missing = tmp_path / "not-read.pth"  # never opened: the Hub check comes first
    with pytest.raises(ConversionError, match=r"--push-to-hub someone/xvlm-tiny: the Hub is offline \(HF_HUB_OFFLINE=1\)"):
        convert_checkpoint(missing, tmp_path / "out", push_to_hub="someone/xvlm-tiny", hub_api=api)
    assert not api.method_calls and not (tmp_path / "out").exists()
    code = main(["--checkpoint", str(missing), "--output", str(tmp_path / "out"), "--push-to-hub", "someone/xvlm-tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "hf upload REPO FOLDER" in err
    with pytest.raises(ConversionError, match="offline"):
        push_folder(tmp_path, "someone/xvlm-tiny", api=api)
    assert not api.method_calls


# ----------------------------------------------------------------------------------------------------------------
# docs/weights.md: the same rows as the converter's table, linked from the README's first screen
# ----------------------------------------------------------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")


def _weights_table() -> dict[str, list[str]]:
    with open(os.path.join(REPO_ROOT, "docs", "weights.md"), encoding="utf-8") as handle:
        lines = [line for line in handle if line.startswith("| `") and not line.startswith("| `--official`")]
    return {cells[0].strip("`"): cells for cells in (
        [cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines)}


def test_docs_weights_table_is_the_official_checkpoint_table():
    table = _weights_table()
    assert list(table) == list(OFFICIAL_CHECKPOINTS)
    for name, (_, readme, task, resolution, yaml, result) in table.items():
        row = OFFICIAL_CHECKPOINTS[name]
        assert LINK.sub(r"\1", readme) == row.readme_name, name
        assert LINK.search(readme).group(2) == row.url, name
        assert (task, int(resolution), yaml) == (f"`{row.task}`", row.image_size, f"`{row.config}`"), name
        assert (result == "not in the README") == (not row.result), name
        assert row.task in MODEL_TASKS


def test_readme_first_screen_and_index_link_the_weights_page():
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as handle:
        first_screen = "".join(handle.readlines()[:40])
    assert "(docs/weights.md)" in first_screen and "xvlm-convert --checkpoint" in first_screen
    with open(os.path.join(REPO_ROOT, "docs", "index.md"), encoding="utf-8") as handle:
        assert "(weights.md)" in handle.read()
