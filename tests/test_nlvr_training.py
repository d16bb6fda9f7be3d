"""NLVR2 training and evaluation: processor pairs, the NLVR2 / text-assignment collators, ``xvlm-train nlvr2`` and
``nlvr2-pretrain`` on tiny in-memory rows, ``evaluate_nlvr2`` and ``transformers.Trainer`` fine-tuning."""

from __future__ import annotations

import math
import random

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_xvlm import XVLMConfig, XVLMForImagesAndTextClassification, XVLMForPretraining
from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config

SENTENCES = [
    "the left image has two dogs",
    "there is a cat on the right",
    "both images show a red car",
    "one image has a person and a dog",
    "the dogs are on a sofa",
    "a cat is on a table",
    "the car in the left image is blue",
    "there are three dogs in total",
]


def _image(seed: int, size: int = 48) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def _nlvr2_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {"identifier": f"ex-{offset + i}", "left_image": _image(2 * (offset + i)),
         "right_image": _image(2 * (offset + i) + 1), "sentence": SENTENCES[(offset + i) % len(SENTENCES)],
         "label": (offset + i) % 2}
        for i in range(n)
    ]


def _pretrain_rows(n: int) -> list[dict]:
    return [{"image_id": str(i), "image": _image(100 + i), "captions": [SENTENCES[i % len(SENTENCES)]],
             "objects": []} for i in range(n)]


@pytest.fixture(scope="module")
def processor():
    from modeling_xvlm.data import synthetic_tokenizer
    from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

    return XVLMProcessor(
        image_processor=XVLMImageProcessorPil(size={"height": 64, "width": 64}, patch_size=8),
        tokenizer=synthetic_tokenizer(),
    )


def _tiny_nlvr2(processor) -> XVLMForImagesAndTextClassification:
    torch.manual_seed(0)
    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(processor.tokenizer)})
    return XVLMForImagesAndTextClassification(nlvr2_config(config))


# ----------------------------------------------------------------------------------------------------------------
# Processor and collators
# ----------------------------------------------------------------------------------------------------------------


def test_processor_image_pairs(processor):
    rows = _nlvr2_rows(3)
    pairs = [(r["left_image"], r["right_image"]) for r in rows]
    out = processor(images=pairs, text=[r["sentence"] for r in rows])
    assert tuple(out["pixel_values"].shape) == (3, 2, 3, 64, 64)
    assert out["input_ids"].shape[0] == 3 and "image_index" not in out
    flat = processor(images=[im for pair in pairs for im in pair])["pixel_values"]
    assert torch.equal(out["pixel_values"].flatten(0, 1), flat)  # left0, right0, left1, ...
    assert torch.equal(out["pixel_values"][1, 1], flat[3])
    # [CLS] words, no [SEP], as the official NLVR2 inputs
    assert out["input_ids"][0, 0].item() == processor.tokenizer.cls_token_id
    assert processor.tokenizer.sep_token_id not in out["input_ids"].tolist()[0]
    # images only
    assert tuple(processor(images=pairs[:2])["pixel_values"].shape) == (2, 2, 3, 64, 64)


@pytest.mark.parametrize(
    "images, text, message",
    [
        ("three", ["a"], "exactly two"),
        ("mixed", ["a", "b"], "single image"),
        ("pairs", ["a"], "one sentence per pair"),
        ("pairs", ["a", "b", "c"], "one sentence per pair"),
    ],
)
def test_processor_image_pairs_are_validated(processor, images, text, message):
    a, b, c = _image(0), _image(1), _image(2)
    given = {"three": [(a, b, c)], "mixed": [(a, b), c], "pairs": [(a, b), (b, c)]}[images]
    with pytest.raises(ValueError, match=message):
        processor(images=given, text=text)


def test_processor_image_pairs_reject_boxes(processor):
    a, b = _image(0), _image(1)
    with pytest.raises(ValueError, match="not supported with image pairs"):
        processor(images=[(a, b)], text=["a dog"], boxes=[[0, 0, 4, 4]])


def test_nlvr2_collator_batch(processor):
    from modeling_xvlm.training import XVLMNLVR2Collator, nlvr2_train_transform

    rows = _nlvr2_rows(4)
    for transform in (None, nlvr2_train_transform(64)):
        batch = XVLMNLVR2Collator(processor, transform)(rows)
        assert tuple(batch["pixel_values"].shape) == (4, 2, 3, 64, 64)
        assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"].shape == batch["input_ids"].shape
        assert batch["labels"].tolist() == [0, 1, 0, 1] and batch["labels"].dtype == torch.long
    evaluation = XVLMNLVR2Collator(processor)(rows)
    expected = processor(images=[(r["left_image"], r["right_image"]) for r in rows],
                         text=[r["sentence"] for r in rows])
    assert torch.equal(evaluation["pixel_values"], expected["pixel_values"])
    assert torch.equal(evaluation["input_ids"], expected["input_ids"])
    # string labels of the official annotation files
    assert XVLMNLVR2Collator(processor)([{**rows[0], "label": "True"}])["labels"].tolist() == [1]


@pytest.mark.parametrize("careful_hflip", [True, False])
def test_nlvr2_collator_never_flips_left_right_sentences(processor, careful_hflip):
    from modeling_xvlm.training import XVLMImageTextTransform, XVLMNLVR2Collator

    # a transform that always flips (plain resize, no RandAugment), even with careful_hflip=False
    transform = XVLMImageTextTransform(64, scale=(1.0, 1.0), hflip_prob=1.0, careful_hflip=careful_hflip,
                                       randaugment=False)
    collator = XVLMNLVR2Collator(processor, transform)
    left, right = _image(0), _image(1)
    plain = processor(images=[(left, right)])["pixel_values"]
    flipped = plain.flip(-1)
    for sentence in ("the dog on the left is brown", "a cat is on the RIGHT", "the rightmost dog"):
        batch = collator([{"left_image": left, "right_image": right, "sentence": sentence, "label": 1}])
        assert torch.allclose(batch["pixel_values"], plain, atol=1e-5), sentence
    batch = collator([{"left_image": left, "right_image": right, "sentence": "two dogs on a sofa", "label": 1}])
    assert not torch.allclose(batch["pixel_values"], plain, atol=1e-3)
    assert torch.allclose(batch["pixel_values"], flipped, atol=1e-5)


def test_text_assignment_collator(processor):
    from modeling_xvlm.training import XVLMImageTextTransform, XVLMTextAssignmentCollator
    from modeling_xvlm.training.data import pretrain_image_text_row

    rows = [pretrain_image_text_row(r) for r in _pretrain_rows(4)]
    batch = XVLMTextAssignmentCollator(processor, XVLMImageTextTransform(64, scale=(0.2, 1.0)))(rows)
    assert tuple(batch["pixel_values"].shape) == (4, 3, 64, 64)
    assert batch["input_ids"].shape[0] == 4 and batch["return_loss"] is True
    # the pretrain schema directly (`captions`)
    assert XVLMTextAssignmentCollator(processor)(_pretrain_rows(3))["input_ids"].shape[0] == 3


# ----------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------


def test_nlvr2_recipes_and_head_lr_mult():
    from modeling_xvlm import XVLMForTextAssignment
    from modeling_xvlm.training.recipe import get_recipe, new_parameter_names

    recipe = get_recipe("nlvr2")
    assert (recipe.lr, recipe.lr_mult, recipe.weight_decay, recipe.epochs, recipe.warmup, recipe.batch_size) == (
        3e-5, 2.0, 0.01, 10, 0.1, 10)  # configs/NLVR.yaml
    assert recipe.max_grad_norm is None and recipe.new_params_get_lr_mult
    ta = get_recipe("nlvr2-pretrain")
    assert ta.new_params_get_lr_mult and ta.max_grad_norm == 1.0
    config = nlvr2_config(XVLMConfig.from_preset("tiny"))
    new = new_parameter_names(XVLMForImagesAndTextClassification(config), "nlvr2")
    assert new and all(n.startswith("cls_head.") for n in new)
    new = new_parameter_names(XVLMForTextAssignment(config), "nlvr2-pretrain")
    assert new == {"ta_head.weight", "ta_head.bias"}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def test_evaluate_nlvr2_equals_hand_computation(processor):
    from modeling_xvlm.training import evaluate_nlvr2

    model = _tiny_nlvr2(processor).eval()
    rows = _nlvr2_rows(7)
    metrics = evaluate_nlvr2(model, processor, rows, batch_size=3, return_predictions=True)
    with torch.no_grad():
        inputs = processor(images=[(r["left_image"], r["right_image"]) for r in rows],
                           text=[r["sentence"] for r in rows])
        predictions = model(**inputs).logits.argmax(-1).tolist()
    labels = [r["label"] for r in rows]
    assert metrics["predictions"] == predictions
    assert metrics["accuracy"] == pytest.approx(100.0 * sum(p == y for p, y in zip(predictions, labels)) / 7)
    assert metrics["num_examples"] == 7 and metrics["majority_baseline"] == pytest.approx(100 * 4 / 7)
    assert evaluate_nlvr2(model, processor, rows, batch_size=2, max_examples=4)["num_examples"] == 4


# ----------------------------------------------------------------------------------------------------------------
# xvlm-train
# ----------------------------------------------------------------------------------------------------------------


def _common(tmp_path, name):
    return dict(tokenizer="synthetic", batch_size=4, progress=False, cpu=True, log_every=1, randaugment=True,
                output_dir=str(tmp_path / name), eval_batch_size=4)


def test_train_nlvr2_and_resume(tmp_path):
    from modeling_xvlm.training.train import TrainConfig, train

    torch.set_num_threads(1)
    data = {("nlvr2", "train"): _nlvr2_rows(8), ("nlvr2", "validation"): _nlvr2_rows(5, offset=8)}
    summary = train(TrainConfig(task="nlvr2", max_steps=3, save_every=2, **_common(tmp_path, "nlvr2")), data=data)
    assert summary["steps"] == 3
    assert math.isfinite(summary["last_losses"]["loss"])
    assert 0.0 <= summary["eval"]["eval/accuracy"] <= 100.0
    model = XVLMForImagesAndTextClassification.from_pretrained(tmp_path / "nlvr2")
    assert model.config.text_config.tie_cross_attention_pairs
    # resume from the step-2 checkpoint: the final weights equal the uninterrupted run's
    resumed = train(TrainConfig(task="nlvr2", max_steps=3, save_every=2, resume=str(tmp_path / "nlvr2" /
                                "checkpoints" / "step-00000002"), **_common(tmp_path, "nlvr2-resumed")), data=data)
    assert resumed["steps"] == 3
    again = XVLMForImagesAndTextClassification.from_pretrained(tmp_path / "nlvr2-resumed")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # the same checkpoint guarantees as every task: a changed run is refused, a changed file is never loaded
    from modeling_xvlm.training.checkpointing import CheckpointError

    step2 = tmp_path / "nlvr2" / "checkpoints" / "step-00000002"
    with pytest.raises(CheckpointError, match="seed: 42 -> 3"):
        train(TrainConfig(task="nlvr2", max_steps=3, save_every=2, seed=3, resume=str(step2),
                          **_common(tmp_path, "nlvr2-seed")), data=data)
    (step2 / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="optimizer.pt has 0 bytes"):
        train(TrainConfig(task="nlvr2", max_steps=3, save_every=2, resume=str(step2),
                          **_common(tmp_path, "nlvr2-bad")), data=data)


def test_train_nlvr2_from_pretraining_folder(tmp_path, processor):
    from modeling_xvlm.training.train import TrainConfig, train

    torch.set_num_threads(1)
    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(processor.tokenizer)})
    XVLMForPretraining(config).save_pretrained(tmp_path / "pre")
    processor.save_pretrained(tmp_path / "pre")
    data = {("nlvr2", "train"): _nlvr2_rows(8), ("nlvr2", "validation"): _nlvr2_rows(4, offset=8)}
    common = _common(tmp_path, "ft")
    common.pop("tokenizer")
    summary = train(TrainConfig(task="nlvr2", model=str(tmp_path / "pre"), max_steps=2, **common), data=data)
    assert summary["steps"] == 2 and "eval/accuracy" in summary["eval"]
    model = XVLMForImagesAndTextClassification.from_pretrained(tmp_path / "ft")
    n_text = config.text_config.num_hidden_layers - config.text_config.fusion_layer
    assert model.config.text_config.num_hidden_layers == config.text_config.fusion_layer + 2 * n_text


def test_train_nlvr2_pretrain_then_nlvr2(tmp_path):
    from modeling_xvlm import XVLMForTextAssignment
    from modeling_xvlm.training.train import TrainConfig, train

    torch.set_num_threads(1)
    random.seed(0)
    data = {("pretrain", "train"): _pretrain_rows(8)}
    summary = train(TrainConfig(task="nlvr2-pretrain", max_steps=2, **_common(tmp_path, "ta")), data=data)
    assert summary["steps"] == 2 and math.isfinite(summary["last_losses"]["loss"])
    assert summary["eval"] == {}
    assert isinstance(XVLMForTextAssignment.from_pretrained(tmp_path / "ta"), XVLMForTextAssignment)
    # the text-assignment checkpoint (NLVR2 text stack) starts the NLVR2 fine-tuning with from_pretrained
    data = {("nlvr2", "train"): _nlvr2_rows(4), ("nlvr2", "validation"): _nlvr2_rows(2, offset=4)}
    common = _common(tmp_path, "ta-ft")
    common.pop("tokenizer")
    out = train(TrainConfig(task="nlvr2", model=str(tmp_path / "ta"), max_steps=1, **common), data=data)
    assert "eval/accuracy" in out["eval"]


# ----------------------------------------------------------------------------------------------------------------
# transformers.Trainer
# ----------------------------------------------------------------------------------------------------------------


def test_trainer_nlvr2_with_collator(tmp_path, processor):
    from transformers import Trainer, TrainingArguments

    from modeling_xvlm.training import XVLMNLVR2Collator, nlvr2_train_transform

    torch.set_num_threads(1)
    model = _tiny_nlvr2(processor)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        remove_unused_columns=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_nlvr2_rows(8),
                      data_collator=XVLMNLVR2Collator(processor, nlvr2_train_transform(64, randaugment=False)))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    trainer.data_collator = XVLMNLVR2Collator(processor)  # evaluation transform
    metrics = trainer.evaluate(eval_dataset=_nlvr2_rows(4, offset=8))
    assert math.isfinite(metrics["eval_loss"])


def test_cli_parsers_accept_the_nlvr2_tasks(tmp_path, processor, monkeypatch, capsys):
    from modeling_xvlm.training import evaluate as evaluate_module
    from modeling_xvlm.training.train import build_parser

    for task in ("nlvr2", "nlvr2-pretrain"):
        assert build_parser().parse_args([task]).task == task
    model = _tiny_nlvr2(processor)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    rows = _nlvr2_rows(3)
    monkeypatch.setattr(evaluate_module, "load_xvlm_dataset", lambda dataset, config, split: rows)
    assert evaluate_module.main(["nlvr2", "--model", str(tmp_path / "m"), "--device", "cpu",
                                 "--output", str(tmp_path / "m.json")]) == 0
    import json

    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_examples"] == 3 and 0 <= metrics["accuracy"] <= 100
    assert "accuracy" in capsys.readouterr().out
