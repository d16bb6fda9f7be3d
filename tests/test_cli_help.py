"""Every command and subcommand says what it does in `--help` (the real console entry points' parsers)."""

from __future__ import annotations

import pytest

from modeling_xvlm.conversion.__main__ import main as xvlm_convert
from modeling_xvlm.data.cli import main as xvlm_data
from modeling_xvlm.training.cli import main as xvlm_train
from modeling_xvlm.training.evaluate import EVAL_TASK_HELP
from modeling_xvlm.training.evaluate import main as xvlm_eval
from modeling_xvlm.training.train import TASK_HELP, TASKS


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    """argparse wraps help at the terminal width (and breaks words at hyphens): one line per paragraph here."""
    monkeypatch.setenv("COLUMNS", "2000")


def _help(main, argv: list[str], capsys) -> str:
    """The `--help` text of `main(argv + ["--help"])` (argparse exits 0 after printing it)."""
    try:
        code = main([*argv, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    assert code in (0, None)
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare on single spaces


def test_xvlm_train_help_lists_every_task_with_what_it_trains(capsys):
    text = _help(xvlm_train, [], capsys)
    assert set(TASK_HELP) == set(TASKS)
    for task, what in TASK_HELP.items():
        assert f"{task} {what}" in text, task
    assert "Pre-train a small X-VLM on the synthetic dataset" in text  # the demo, what no arguments run
    assert "xvlm-train TASK --help" in text


@pytest.mark.parametrize("task", TASKS)
def test_xvlm_train_task_help_describes_the_command_and_the_task(task, capsys):
    text = _help(xvlm_train, [task], capsys)
    assert text.startswith("usage: xvlm-train")
    assert "Train X-VLM (pre-training; retrieval, grounding, NLVR2, VQA or captioning fine-tuning" in text
    assert f"{task}: {TASK_HELP[task]}" in text
    assert "--progress, --no-progress" in text


def test_xvlm_train_demo_help(capsys):
    text = _help(xvlm_train, ["demo"], capsys)
    assert "Pre-train a small X-VLM on the synthetic dataset, fine-tune it" in text and "--no-regions" in text


def test_xvlm_eval_help_describes_every_task_protocol(capsys):
    text = _help(xvlm_eval, [], capsys)
    assert "Evaluate an X-VLM model with the official" in text
    for task, what in EVAL_TASK_HELP.items():
        assert f"{task}: {' '.join(what.split())}" in text, task
    assert "--progress, --no-progress" in text


@pytest.mark.parametrize(
    "command, words",
    [("synthetic", "Generate the synthetic shapes dataset (configurations pretrain, retrieval"),
     ("convert-official", "Convert the official X-VLM annotation files"),
     ("info", "Print the configurations, splits, row counts and features")],
)
def test_xvlm_data_subcommands_say_what_they_do(command, words, capsys):
    text = _help(xvlm_data, [command], capsys)
    assert words in text
    if command != "info":
        assert "--progress, --no-progress" in text
    overview = _help(xvlm_data, [], capsys)
    assert command in overview and "X-VLM datasets in the Hugging Face Hub format" in overview


def test_xvlm_convert_help(capsys):
    text = _help(xvlm_convert, [], capsys)
    assert "Convert an official X-VLM checkpoint" in text
    for flag in ("--task", "--official", "--tokenizer", "--no-tokenizer", "--push-to-hub"):
        assert flag in text, flag


def _documented_flags() -> set[str]:
    """Every `--flag` the docs and the README write, with `--{a,b}-x` / `--x-{a,b}` brace forms expanded."""
    import itertools
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = "\n".join(p.read_text(encoding="utf-8") for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    flags = set()
    for token in re.findall(r"--[\w{},-]*[\w}]", text):
        parts = re.split(r"(\{[^}]*\})", token)
        choices = [part[1:-1].split(",") if part.startswith("{") else [part] for part in parts]
        flags.update("".join(combo) for combo in itertools.product(*choices))
    return flags


def _actions(parser):
    """`(command, option strings)` of every option of a parser and its subcommands."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {command}".strip(), strings) for command, strings in _actions(sub))
        elif action.option_strings and "--help" not in action.option_strings:
            yield "", action.option_strings


def test_every_cli_option_is_documented():
    """docs/ name every option of every command (an option is documented when one of its spellings is)."""
    from modeling_xvlm.conversion.__main__ import build_parser as convert_parser
    from modeling_xvlm.data.cli import build_parser as data_parser
    from modeling_xvlm.training.evaluate import build_parser as eval_parser
    from modeling_xvlm.training.main_job import build_parser as demo_parser
    from modeling_xvlm.training.train import build_parser as train_parser

    documented = _documented_flags()
    missing = []
    for program, parser in (("xvlm-train", train_parser()), ("xvlm-train demo", demo_parser()),
                            ("xvlm-eval", eval_parser()), ("xvlm-data", data_parser()),
                            ("xvlm-convert", convert_parser())):
        for command, strings in _actions(parser):
            if not documented & set(strings):
                missing.append(f"{program} {command} {strings[-1]}".replace("  ", " "))
    assert not missing, f"options missing from docs/: {missing}"
