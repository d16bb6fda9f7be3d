"""VQA training and evaluation: answer weights, the VQA collator (careful flip), the recipe, the metrics,
``evaluate_vqa``, ``xvlm-eval vqa``, ``xvlm-train vqa`` (loss, resume, pre-training init) and ``transformers.Trainer``
on tiny in-memory rows."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_xvlm import XVLMConfig, XVLMForPretraining
from modeling_xvlm.modeling_xvlm_vqa import XVLMForQuestionAnswering

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    "What color is the circle?",
    "How many squares are there?",
    "Is there a triangle on the left?",
    "What shape is at the top?",
    "How many circles are there?",
    "What color is the square?",
]
ANSWERS = [
    ["red"] * 7 + ["blue"] * 3,
    ["two"] * 5 + ["three"] * 4 + ["one"],
    ["yes"] * 10,
    ["circle"] * 8 + ["square", "large diamond"],
    ["three"],  # a Visual Genome question: one answer
    ["blue"] * 6 + ["green"] * 4,
]
SOURCES = ["vqa", "vqa", "vqa", "gqa", "vg", ""]
ANSWER_LIST = ["red", "blue", "two", "three", "yes", "no", "circle", "large square"]


def _image(seed: int, size: int = 48) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def _vqa_rows(n: int, offset: int = 0, with_answers: bool = True) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        k = i % len(QUESTIONS)
        rows.append({"question_id": 1000 + i, "image": _image(i), "image_id": str(i), "question": QUESTIONS[k],
                     "answers": list(ANSWERS[k]) if with_answers else [], "source": SOURCES[k], "group": ""})
    return rows


@pytest.fixture(scope="module")
def processor():
    from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

    from modeling_xvlm.data import synthetic_tokenizer

    return XVLMProcessor(
        image_processor=XVLMImageProcessorPil(size={"height": 64, "width": 64}, patch_size=8),
        tokenizer=synthetic_tokenizer(),
    )


def _tiny_vqa(processor, **text) -> XVLMForQuestionAnswering:
    torch.manual_seed(0)
    tok = processor.tokenizer
    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(tok), "bos_token_id": tok.cls_token_id,
                                                         "eos_token_id": tok.sep_token_id, **text})
    return XVLMForQuestionAnswering(config)


# ----------------------------------------------------------------------------------------------------------------
# Answer weights and the collator
# ----------------------------------------------------------------------------------------------------------------


def _official_weights(answers: list[str]) -> tuple[list[str], list[float]]:
    """Official `vqa_dataset.py` (train, not VG): accumulate 1/len per occurrence."""
    weights: dict[str, float] = {}
    for answer in answers:
        weights[answer] = weights.get(answer, 0.0) + 1 / len(answers)
    return list(weights), list(weights.values())


def test_vqa_answer_weights_official_values():
    from modeling_xvlm.training import vqa_answer_weights

    answers = ["yes", "no", "yes", "maybe", "yes", "no", "yes", "yes", "no", "yes"]
    unique, weights = vqa_answer_weights(answers, "vqa")
    assert unique == ["yes", "no", "maybe"]  # first-seen order
    assert weights == pytest.approx([0.6, 0.3, 0.1], abs=1e-12)
    official = _official_weights(answers)
    assert unique == official[0] and weights == pytest.approx(official[1], abs=1e-12)
    for source in ("", "gqa"):  # everything but VG is weighted like VQA
        assert vqa_answer_weights(answers, source) == (unique, weights)
    assert vqa_answer_weights(["two"], "vg") == (["two"], [0.5])  # a VG answer always weighs 0.5
    assert vqa_answer_weights(["two", "two"], "vqa") == (["two"], [1.0])
    with pytest.raises(ValueError, match="at least one answer"):
        vqa_answer_weights([], "vqa")
    with pytest.raises(ValueError, match="Visual Genome"):
        vqa_answer_weights(["two", "three"], "vg")


def test_vqa_collator_batch(processor):
    from modeling_xvlm.training import XVLMVQACollator, vqa_answer_weights

    rows = _vqa_rows(6)
    batch = XVLMVQACollator(processor)(rows)  # evaluation transform
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels", "decoder_attention_mask",
                          "answer_weights", "answers_per_question"}
    expected = processor(images=[r["image"] for r in rows], text=[r["question"] for r in rows],
                         text_preprocessing="question", max_words=30)
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert processor.tokenizer.sep_token_id not in batch["input_ids"].tolist()[0]  # [CLS] words, no [SEP]
    # the unique answers of each question, consecutive, with their official weights
    per_row = [vqa_answer_weights(r["answers"], r["source"]) for r in rows]
    flat = [a for unique, _ in per_row for a in unique]
    assert batch["answers_per_question"].tolist() == [2, 3, 1, 3, 1, 2]
    assert batch["answer_weights"].tolist() == pytest.approx([w for _, ws in per_row for w in ws])
    assert batch["answer_weights"][9].item() == 0.5  # the VG row
    answers = processor.encode_answers(flat)
    assert tuple(batch["labels"].shape) == tuple(answers["input_ids"].shape) == (len(flat), batch["labels"].shape[1])
    assert torch.equal(batch["decoder_attention_mask"], answers["attention_mask"])
    assert torch.equal(batch["labels"], answers["input_ids"].masked_fill(answers["attention_mask"] == 0, -100))
    assert (batch["labels"] == -100).any() and (batch["labels"][:, 0] == processor.tokenizer.cls_token_id).all()
    # the batch is exactly XVLMForQuestionAnswering's input; its loss is the official weighted sum / B
    model = _tiny_vqa(processor)
    out = model(**batch)
    assert torch.allclose(out.loss, (batch["answer_weights"] * out.answer_loss).sum() / 6, atol=1e-6)
    # a training batch (official transform) has the same structure
    from modeling_xvlm.training import vqa_train_transform

    train_batch = XVLMVQACollator(processor, vqa_train_transform(64))(rows)
    assert tuple(train_batch["pixel_values"].shape) == (6, 3, 64, 64)
    assert torch.equal(train_batch["labels"], batch["labels"])


def test_vqa_collator_question_length(processor):
    from modeling_xvlm.training import XVLMVQACollator

    long_row = {**_vqa_rows(1)[0], "question": " ".join(["red"] * 60) + "?"}
    assert XVLMVQACollator(processor)([long_row])["input_ids"].shape[1] == 1 + 30  # pre_question: 30 words
    assert XVLMVQACollator(processor, max_words=50)([long_row])["input_ids"].shape[1] == 40  # max_tokens 40
    assert XVLMVQACollator(processor, max_words=50, max_length=None)([long_row])["input_ids"].shape[1] == 51


def test_vqa_collator_errors(processor):
    from modeling_xvlm.training import XVLMVQACollator, vqa_train_transform

    train = XVLMVQACollator(processor, vqa_train_transform(64))
    with pytest.raises(ValueError, match=r"training row 1 \(question_id 1001\) has no answers"):
        train([_vqa_rows(1)[0], _vqa_rows(1, offset=1, with_answers=False)[0]])
    with pytest.raises(ValueError, match="some VQA rows have answers and others not"):
        XVLMVQACollator(processor)([_vqa_rows(1)[0], _vqa_rows(1, offset=1, with_answers=False)[0]])
    with pytest.raises(ValueError, match="has no question"):
        XVLMVQACollator(processor)([{"image": _image(0), "answers": ["red"]}])
    # test questions (no answers) give a ranking batch
    batch = XVLMVQACollator(processor)(_vqa_rows(2, with_answers=False))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}


def test_vqa_careful_flip(processor):
    from modeling_xvlm.training import XVLMVQACollator, vqa_train_transform
    from modeling_xvlm.training.collators import reseed

    image = _image(3)
    plain = processor(images=[image])["pixel_values"]
    flipped = processor(images=[image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)])["pixel_values"]
    transform = vqa_train_transform(64, randaugment=False, crop_scale_min=1.0)  # plain resize, never flips itself
    row = {"image": image, "question": "what color is the circle?", "answers": ["red"], "source": "vqa"}
    lr_rows = [
        {**row, "question": "what is on the left of the circle?"},
        {**row, "question": "Left or right?"},  # any case
        {**row, "question": "where is the circle?", "answers": ["red", "on the right"]},  # an answer counts too
        {**row, "question": "is the circle upright?"},  # the official substring test
    ]
    always = XVLMVQACollator(processor, transform, hflip_prob=1.0)
    for r in lr_rows:
        assert torch.equal(always([r])["pixel_values"], plain), r["question"]
    assert torch.equal(always([row])["pixel_values"], flipped)  # flipped before the (resize) transform
    assert torch.equal(XVLMVQACollator(processor, transform, hflip_prob=1.0, careful_hflip=False)(lr_rows[:1])[
        "pixel_values"], flipped)
    # the official probability 0.5, over seeds: left/right questions never flip, the others about half the time
    collator = XVLMVQACollator(processor, transform)
    flips = []
    for seed in range(16):
        reseed(collator, seed)
        assert torch.equal(collator(lr_rows[:1])["pixel_values"], plain)
        reseed(collator, seed)
        flips.append(torch.equal(collator([row])["pixel_values"], flipped))
    assert 3 <= sum(flips) <= 13


# ----------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------


def test_vqa_recipe_and_decoder_lr_mult():
    from modeling_xvlm.training.recipe import (
        create_optimizer,
        get_recipe,
        new_parameter_names,
    )

    recipe = get_recipe("vqa")  # configs/VQA.yaml
    assert (recipe.lr, recipe.lr_mult, recipe.weight_decay, recipe.epochs, recipe.warmup, recipe.batch_size) == (
        5e-5, 2.0, 0.01, 10, 0.1, 24)
    assert recipe.max_grad_norm is None and recipe.new_params_get_lr_mult and recipe.extra["k_test"] == 128
    # equal text and vision widths: the decoder's cross-attention key/value are loaded, nothing is new (official)
    assert new_parameter_names(XVLMForQuestionAnswering(XVLMConfig.from_preset("tiny")), "vqa") == set()
    model = XVLMForQuestionAnswering(XVLMConfig.from_preset("tiny", text_config={"hidden_size": 48}))
    new = new_parameter_names(model, "vqa")
    expected = {f"text_decoder.text_model.encoder.layer.0.crossattention.self.{m}.{p}"
                for m in ("key", "value") for p in ("weight", "bias")}
    assert new == expected
    groups = {g["name"]: g for g in create_optimizer(model, 5e-5, 0.01, 2.0, new).param_groups}
    assert groups["decay_new"]["lr"] == pytest.approx(1e-4) and groups["no_decay_new"]["lr"] == pytest.approx(1e-4)
    assert len(groups["decay_new"]["params"]) == 2 and groups["decay"]["lr"] == pytest.approx(5e-5)


# ----------------------------------------------------------------------------------------------------------------
# Metrics and evaluation
# ----------------------------------------------------------------------------------------------------------------


def test_vqa_soft_accuracy_and_metrics():
    from modeling_xvlm.training import vqa_metrics, vqa_soft_accuracy

    answers = ["yes"] * 2 + ["no"] * 8
    assert vqa_soft_accuracy("yes", answers) == pytest.approx(2 / 3)
    assert vqa_soft_accuracy(" No ", answers) == 1.0  # strip + lower
    assert vqa_soft_accuracy("maybe", answers) == 0.0
    assert vqa_soft_accuracy("two", ["two", "three", "two", "two", "two"]) == 1.0  # capped at 3 annotators
    with pytest.raises(ValueError, match="annotator answers"):
        vqa_soft_accuracy("yes", [])
    gts = [answers, ["red"] * 4 + ["blue"] * 6, [], ["two"] + ["three"] * 2]
    metrics = vqa_metrics(["no", "red", "cat", "two"], gts)
    # exact match against the majority answer ("no", "blue", "three"): only the first
    assert metrics["exact_match"] == pytest.approx(100 / 3)
    assert metrics["vqa_accuracy"] == pytest.approx(100 * (1 + 1 + 1 / 3) / 3)
    assert metrics["num_annotated"] == 3  # the row without answers is left out
    # the most frequent annotator answer of these rows is "no" (8 votes)
    assert metrics["majority_answer"] == "no"
    assert metrics["majority_answer_accuracy"] == pytest.approx(100 * (1 + 0 + 0) / 3)
    assert vqa_metrics(["a"], [[]])["vqa_accuracy"] is None
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        vqa_metrics(["a", "b"], [["a"]])


def test_evaluate_vqa_equals_rank_answers(processor, monkeypatch):
    from modeling_xvlm.training import evaluate_vqa, vqa_metrics
    from modeling_xvlm.training.collators import encode_questions

    model = _tiny_vqa(processor).eval()
    rows = _vqa_rows(5)
    rows[4]["answers"] = []  # a test question: answered, not scored
    calls = []
    encode = processor.encode_answers
    monkeypatch.setattr(processor, "encode_answers", lambda answers: calls.append(len(answers)) or encode(answers))
    metrics = evaluate_vqa(model, processor, rows, ANSWER_LIST, batch_size=2, k_test=3)
    assert calls == [len(ANSWER_LIST)]  # the candidates are encoded once for every batch
    candidates = encode(ANSWER_LIST)
    ids, mask = encode_questions(processor, [r["question"] for r in rows], max_words=50, max_length=None)
    ranking = model.rank_answers(processor(images=[r["image"] for r in rows])["pixel_values"], ids, mask,
                                 candidates["input_ids"], candidates["attention_mask"], k=3)
    predictions = [ANSWER_LIST[i] for i in ranking.candidate_indices[:, 0].tolist()]
    assert metrics["results"] == [{"question_id": r["question_id"], "answer": p} for r, p in zip(rows, predictions)]
    expected = vqa_metrics(predictions, [r["answers"] for r in rows])
    for key in ("exact_match", "vqa_accuracy", "majority_answer_accuracy", "num_annotated"):
        assert metrics[key] == pytest.approx(expected[key]), key
    assert metrics["num_examples"] == 5 and metrics["num_annotated"] == 4 and metrics["k_test"] == 3
    assert evaluate_vqa(model, processor, rows, ANSWER_LIST, batch_size=4, max_examples=3)["num_examples"] == 3


def test_evaluate_vqa_on_known_predictions(processor, monkeypatch):
    from modeling_xvlm.modeling_xvlm_vqa import XVLMAnswerRankingOutput
    from modeling_xvlm.training import evaluate_vqa

    model = _tiny_vqa(processor)
    # always rank "blue" first: rows 0 (red x7, blue x3) and 5 (blue x6) of _vqa_rows
    def fixed(pixel_values, input_ids, attention_mask, answer_ids, answer_mask, k, official_answer_scoring):
        b = input_ids.shape[0]
        return XVLMAnswerRankingOutput(candidate_indices=torch.tensor([[1, 0]] * b), probabilities=torch.ones(b, 2))

    monkeypatch.setattr(model, "rank_answers", fixed)
    rows = [_vqa_rows(1)[0], _vqa_rows(1, offset=5)[0]]
    metrics = evaluate_vqa(model, processor, rows, ANSWER_LIST, k_test=2)
    assert [r["answer"] for r in metrics["results"]] == ["blue", "blue"]
    assert metrics["exact_match"] == pytest.approx(50.0)  # the majority answers are "red" and "blue"
    assert metrics["vqa_accuracy"] == pytest.approx(100.0)  # >= 3 annotators said "blue" in both
    with pytest.raises(ValueError, match="no VQA rows"):
        evaluate_vqa(model, processor, [], ANSWER_LIST)
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_vqa(model, processor, rows, [])


def test_xvlm_eval_vqa_result_file(tmp_path, processor, monkeypatch, capsys):
    from modeling_xvlm.training import evaluate as evaluate_module

    model = _tiny_vqa(processor)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    (tmp_path / "answers.json").write_text(json.dumps(ANSWER_LIST))
    for with_answers in (True, False):
        rows = _vqa_rows(3, with_answers=with_answers)
        monkeypatch.setattr(evaluate_module, "load_xvlm_dataset", lambda dataset, config, split, rows=rows: rows)
        out = tmp_path / f"result-{with_answers}.json"
        assert evaluate_module.main(["vqa", "--model", str(tmp_path / "m"), "--device", "cpu", "--answer-list",
                                     str(tmp_path / "answers.json"), "--k-test", "4", "--output", str(out),
                                     "--metrics-output", str(tmp_path / "metrics.json")]) == 0
        result = json.loads(out.read_text())  # the official result file
        assert [r["question_id"] for r in result] == [1000, 1001, 1002]
        assert all(set(r) == {"question_id", "answer"} and r["answer"] in ANSWER_LIST for r in result)
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        printed = capsys.readouterr().out
        if with_answers:
            assert 0 <= metrics["vqa_accuracy"] <= 100 and metrics["num_examples"] == 3
            assert "VQA accuracy" in printed and "exact match" in printed
        else:
            assert metrics["vqa_accuracy"] is None and "no annotations" in printed


# ----------------------------------------------------------------------------------------------------------------
# xvlm-train vqa
# ----------------------------------------------------------------------------------------------------------------


def _common(tmp_path, name, **extra):
    values = dict(task="vqa", tokenizer="synthetic", batch_size=4, progress=False, cpu=True, log_every=1,
                  output_dir=str(tmp_path / name), eval_batch_size=4)
    values.update(extra)
    return values


def test_train_vqa_loss_goes_down(tmp_path):
    from modeling_xvlm.training.train import TrainConfig, train

    messages: list[str] = []
    data = {("vqa", "train"): _vqa_rows(4)}
    summary = train(TrainConfig(max_steps=6, lr=3e-3, randaugment=False, eval_at_end=False, save_final=False,
                                **_common(tmp_path, "loss")), data=data, log=messages.append)
    losses = [float(m) for m in re.findall(r"step \d+/6: loss ([0-9.e+-]+)", "\n".join(messages))]
    assert len(losses) == 6 and summary["steps"] == 6
    assert losses[-1] < 0.9 * losses[0], losses


def test_train_vqa_and_resume(tmp_path):
    from modeling_xvlm.data import synthetic_tokenizer
    from modeling_xvlm.training.train import TrainConfig, train

    data = {("vqa", "train"): _vqa_rows(8), ("vqa", "validation"): _vqa_rows(3, offset=8),
            ("vqa", "answer_list"): ANSWER_LIST}
    summary = train(TrainConfig(max_steps=3, save_every=2, **_common(tmp_path, "vqa")), data=data)
    assert summary["steps"] == 3 and math.isfinite(summary["last_losses"]["loss"])
    assert 0.0 <= summary["eval"]["eval/vqa_accuracy"] <= 100.0
    assert 0.0 <= summary["eval"]["eval/exact_match"] <= 100.0
    model = XVLMForQuestionAnswering.from_pretrained(tmp_path / "vqa")
    tok = synthetic_tokenizer()
    assert (model.config.text_config.bos_token_id, model.config.text_config.eos_token_id) == (
        tok.cls_token_id, tok.sep_token_id)
    assert model.config.text_config.vocab_size == len(tok)
    # resume from the step-2 checkpoint: the final weights equal the uninterrupted run's
    resumed = train(TrainConfig(max_steps=3, save_every=2, eval_at_end=False, resume=str(
        tmp_path / "vqa" / "checkpoints" / "step-00000002"), **_common(tmp_path, "vqa-resumed")), data=data)
    assert resumed["steps"] == 3
    again = XVLMForQuestionAnswering.from_pretrained(tmp_path / "vqa-resumed")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # the same checkpoint guarantees as every task: a changed run is refused, a changed file is never loaded
    from modeling_xvlm.training.checkpointing import CheckpointError

    step2 = tmp_path / "vqa" / "checkpoints" / "step-00000002"
    with pytest.raises(CheckpointError, match="lr: None -> 0.5"):
        train(TrainConfig(max_steps=3, save_every=2, lr=0.5, resume=str(step2), **_common(tmp_path, "vqa-lr")),
              data=data)
    weights = step2 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(CheckpointError, match="model.safetensors has changed"):
        train(TrainConfig(max_steps=3, save_every=2, resume=str(step2), **_common(tmp_path, "vqa-bad")), data=data)


def test_train_vqa_from_pretraining_folder(tmp_path, processor):
    from modeling_xvlm.training.train import TrainConfig, train

    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(processor.tokenizer)})
    pretrained = XVLMForPretraining(config)
    pretrained.save_pretrained(tmp_path / "pre")
    processor.save_pretrained(tmp_path / "pre")
    data = {("vqa", "train"): _vqa_rows(4)}
    common = _common(tmp_path, "ft", model=str(tmp_path / "pre"), lr=0.0, eval_at_end=False)
    common.pop("tokenizer")
    assert train(TrainConfig(max_steps=1, **common), data=data)["steps"] == 1
    model = XVLMForQuestionAnswering.from_pretrained(tmp_path / "ft")
    # lr 0: the weights are the official pre-training -> VQA initialisation
    fusion = config.text_config.fusion_layer
    source = pretrained.state_dict()
    state = model.state_dict()
    assert torch.equal(state["xvlm.text_model.encoder.layer.0.attention.self.query.weight"],
                       source["xvlm.text_model.encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(state["text_decoder.text_model.encoder.layer.0.attention.self.query.weight"],
                       source[f"xvlm.text_model.encoder.layer.{fusion}.attention.self.query.weight"])
    assert model.config.text_config.bos_token_id == processor.tokenizer.cls_token_id  # set from the tokenizer


def test_train_parser_accepts_vqa():
    from modeling_xvlm.training.train import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["vqa", "--image-size", "384", "--eval-every", "100"]))
    assert (cfg.task, cfg.image_size, cfg.eval_every, cfg.k_test) == ("vqa", 384, 100, None)  # k_test: 128 (vqa)


# ----------------------------------------------------------------------------------------------------------------
# transformers.Trainer
# ----------------------------------------------------------------------------------------------------------------


def test_trainer_vqa_with_collator(tmp_path, processor):
    from transformers import Trainer, TrainingArguments

    from modeling_xvlm.training import XVLMVQACollator, vqa_train_transform

    model = _tiny_vqa(processor)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=4,
        per_device_eval_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        remove_unused_columns=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_vqa_rows(4),
                      data_collator=XVLMVQACollator(processor, vqa_train_transform(64, randaugment=False)))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    trainer.data_collator = XVLMVQACollator(processor)  # evaluation transform
    metrics = trainer.evaluate(eval_dataset=_vqa_rows(4, offset=4))
    assert math.isfinite(metrics["eval_loss"])
