"""Fine-tuning the retrieval and grounding heads with ``transformers.Trainer`` and this package's collators."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from modeling_xvlm import XVLMConfig, XVLMForGrounding, XVLMForRetrieval


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from modeling_xvlm.data import SyntheticConfig, load_xvlm_dataset, synthetic_tokenizer, write_synthetic_dataset
    from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

    out = tmp_path_factory.mktemp("trainer_data")
    write_synthetic_dataset(out, SyntheticConfig(num_train=16, num_validation=4, num_test=4), overwrite=True)
    processor = XVLMProcessor(
        image_processor=XVLMImageProcessorPil(size={"height": 64, "width": 64}, patch_size=8),
        tokenizer=synthetic_tokenizer(),
    )
    return out, processor, load_xvlm_dataset


def _args(tmp_path: Path, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the collators need the raw image / text columns
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )


def _config(processor) -> XVLMConfig:
    return XVLMConfig.from_preset(
        "tiny", text_config={"vocab_size": len(processor.tokenizer), "hidden_dropout_prob": 0.0}
    )


def test_trainer_retrieval_loss_moves_and_model_reloads(synthetic, tmp_path):
    from modeling_xvlm.data import retrieval_pairs
    from modeling_xvlm.training import XVLMImageTextTransform, XVLMRetrievalCollator

    folder, processor, load = synthetic
    pairs = retrieval_pairs(load(folder, "retrieval", "train"))
    torch.manual_seed(0)
    model = XVLMForRetrieval(_config(processor))
    collator = XVLMRetrievalCollator(processor, XVLMImageTextTransform(64, randaugment=False))
    trainer = Trainer(model=model, args=_args(tmp_path, 12), train_dataset=pairs, data_collator=collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(loss == loss for loss in losses)
    assert min(losses[-4:]) < losses[0]  # the loss moves down

    trainer.save_model(str(tmp_path / "saved"))
    processor.save_pretrained(str(tmp_path / "saved"))
    reloaded = XVLMForRetrieval.from_pretrained(tmp_path / "saved")
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a.cpu(), b), name


def test_trainer_grounding_steps(synthetic, tmp_path):
    from modeling_xvlm.training import XVLMGroundingTrainCollator

    folder, processor, load = synthetic
    rows = load(folder, "grounding", "train")
    torch.manual_seed(0)
    model = XVLMForGrounding(_config(processor))
    collator = XVLMGroundingTrainCollator(processor, randaugment=True)
    trainer = Trainer(model=model, args=_args(tmp_path, 4), train_dataset=rows, data_collator=collator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    assert any(not torch.equal(before[k], v.cpu()) for k, v in trainer.model.state_dict().items())
    trainer.save_model(str(tmp_path / "grounding"))
    reloaded = XVLMForGrounding.from_pretrained(tmp_path / "grounding")
    batch = collator([rows[0]])
    reloaded.eval()
    with torch.no_grad():
        boxes = reloaded(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).pred_boxes
    assert boxes.shape == (1, 4) and bool(((boxes >= 0) & (boxes <= 1)).all())


def test_trainer_evaluate_reports_eval_loss_for_retrieval_and_grounding(synthetic, tmp_path):
    """One loss rule for every head: `Trainer.evaluate()` (eval mode) gets `eval_loss` from the collators' batches
    as they are (retrieval: `image_ids` + `return_loss`; grounding: box `labels`)."""
    from modeling_xvlm.data import retrieval_pairs
    from modeling_xvlm.training import XVLMGroundingTrainCollator, XVLMRetrievalCollator

    folder, processor, load = synthetic
    pairs = retrieval_pairs(load(folder, "retrieval", "validation"))
    args = _args(tmp_path, 1)
    args.per_device_eval_batch_size = 4
    for model, rows, collator in (
        (XVLMForRetrieval(_config(processor)), pairs, XVLMRetrievalCollator(processor)),
        (XVLMForGrounding(_config(processor)), load(folder, "grounding", "validation"),
         XVLMGroundingTrainCollator(processor, crop=False, randaugment=False).for_evaluation()),
    ):
        metrics = Trainer(model=model, args=args, eval_dataset=rows, data_collator=collator).evaluate()
        assert metrics["eval_loss"] > 0 and metrics["eval_loss"] == metrics["eval_loss"], type(model).__name__


# ----------------------------------------------------------------------------------------------------------------
# Every collator with Trainer's default `remove_unused_columns=True`
# ----------------------------------------------------------------------------------------------------------------


def _pil(seed: int, size: tuple[int, int] = (40, 48)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def _tiny_processor(tiny_tokenizer):
    from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

    return XVLMProcessor(XVLMImageProcessorPil(size={"height": 64, "width": 64}, patch_size=8), tiny_tokenizer)


def _tiny_config(processor, **text_config):
    text = {"vocab_size": len(processor.tokenizer), "hidden_dropout_prob": 0.0, **text_config}
    return XVLMConfig.from_preset("tiny", text_config=text)


def _case(name: str, processor):
    """`(collator, model, columns)` of one collator: a tiny model it trains and 4 rows of the columns it reads
    (plus a column no one reads, `note`)."""
    from modeling_xvlm import (XVLMForConditionalGeneration, XVLMForImagesAndTextClassification, XVLMForPretraining,
                               XVLMForQuestionAnswering, XVLMForTextAssignment)
    from modeling_xvlm.caption_metrics import CiderD
    from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config
    from modeling_xvlm.training import (XVLMCaptioningCollator, XVLMCaptioningSCSTCollator, XVLMGroundingCollator,
                                        XVLMGroundingTrainCollator, XVLMImageTextTransform, XVLMNLVR2Collator,
                                        XVLMPretrainCollator, XVLMRetrievalCollator, XVLMSelfCriticalCaptioning,
                                        XVLMTextAssignmentCollator, XVLMVQACollator, captioning_train_transform,
                                        nlvr2_train_transform, scst_document_frequencies, vqa_train_transform)

    n = 4
    images = [_pil(k) for k in range(n)]
    captions = ["a red circle", "a blue square on the left", "the green triangle", "a small black dog"]
    columns = {"image": images, "note": [f"row {k}" for k in range(n)]}
    config = _tiny_config(processor)
    if name == "retrieval":
        columns |= {"caption": captions, "image_index": [0, 0, 1, 2]}
        return (XVLMRetrievalCollator(processor, XVLMImageTextTransform(64, randaugment=False)),
                XVLMForRetrieval(config), columns)
    if name in ("grounding-train", "grounding"):
        columns |= {"text": captions, "bbox": [[4.0, 6.0, 20.0, 18.0], [0.0, 0.0, 40.0, 48.0],
                                               [10.0, 12.0, 8.0, 30.0], [30.0, 2.0, 9.0, 9.0]]}
        collator = (XVLMGroundingTrainCollator(processor, randaugment=False) if name == "grounding-train"
                    else XVLMGroundingCollator(processor))
        return collator, XVLMForGrounding(config), columns
    if name == "pretrain":
        columns |= {"caption": captions, "objects": [[{"bbox": [4.0, 6.0, 20.0, 18.0], "caption": "the red circle"}]
                                                     for _ in range(n)]}
        return XVLMPretrainCollator(processor, seed=0), XVLMForPretraining(config), columns
    if name == "nlvr2":
        columns = {"left_image": images, "right_image": images[::-1], "sentence": captions, "label": [0, 1, 1, 0],
                   "note": columns["note"]}
        model = XVLMForImagesAndTextClassification(nlvr2_config(config))
        return XVLMNLVR2Collator(processor, nlvr2_train_transform(64, randaugment=False)), model, columns
    if name == "text-assignment":
        columns |= {"caption": captions}
        collator = XVLMTextAssignmentCollator(processor, XVLMImageTextTransform(64, scale=(0.2, 1.0), randaugment=False))
        return collator, XVLMForTextAssignment(nlvr2_config(config)), columns
    generation = _tiny_config(processor, bos_token_id=2, eos_token_id=3)
    if name == "vqa":
        columns |= {"question": ["what is the shape", "is it red", "what colour", "is it a dog"],
                    "answers": [["circle", "circle", "square"], ["yes"], ["red"], ["no"]],
                    "source": ["vqa", "vg", "vg", "vg"]}
        collator = XVLMVQACollator(processor, vqa_train_transform(64, randaugment=False))
        return collator, XVLMForQuestionAnswering(generation), columns
    if name == "captioning":
        columns |= {"caption": captions}
        collator = XVLMCaptioningCollator(processor, captioning_train_transform(64, randaugment=False))
        return collator, XVLMForConditionalGeneration(generation), columns
    if name == "scst":
        collator = XVLMCaptioningSCSTCollator(processor)
        captioner = XVLMForConditionalGeneration(generation)
        # A random captioner scores CIDEr 0 on any caption, so the advantage (and the step) would be 0: its own
        # greedy captions become one of the references, which gives the greedy captions the higher reward, and a
        # near-flat output layer makes the samples differ from them.
        with torch.no_grad():
            captioner.text_decoder.get_output_embeddings().weight.mul_(0.01)
        pixel_values = collator([{"image": im, "captions": ["x"]} for im in images])["pixel_values"]
        probe = XVLMSelfCriticalCaptioning(captioner, processor, CiderD(scst_document_frequencies([captions])),
                                           num_samples=2, max_length=6)
        greedy = probe(pixel_values, [[c] for c in captions]).greedy
        columns |= {"captions": [[c, g] for c, g in zip(captions, greedy)]}
        # document frequencies over more images than the batch's: a greedy caption shared by every image of the
        # batch still has a positive idf (and so a positive reward)
        cider = CiderD(scst_document_frequencies(columns["captions"] + [[c] for c in captions]))
        model = XVLMSelfCriticalCaptioning(captioner, processor, cider, num_samples=2, max_length=6)
        return collator, model, columns
    raise AssertionError(name)


CASES = ("retrieval", "grounding-train", "grounding", "pretrain", "nlvr2", "text-assignment", "vqa", "captioning",
         "scst")
#: The first column each collator cannot do without (what a stripped row lacks).
FIRST_REQUIRED = {name: "left_image" if name == "nlvr2" else "image" for name in CASES}


def _default_args(tmp_path: Path, steps: int = 2) -> TrainingArguments:
    """`TrainingArguments` as a user writes them: `remove_unused_columns` left at its default (True)."""
    return TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=2,
                             per_device_eval_batch_size=4, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)


@pytest.mark.parametrize("name", CASES)
def test_xvlm_trainer_trains_every_collator_with_default_arguments(name, tiny_tokenizer, tmp_path):
    import datasets

    from modeling_xvlm.training import XVLMTrainer

    processor = _tiny_processor(tiny_tokenizer)
    collator, model, columns = _case(name, processor)
    dataset = datasets.Dataset.from_dict(columns)
    args = _default_args(tmp_path)
    assert args.remove_unused_columns is True
    seen: list[set[str]] = []

    def spy(rows):
        seen.append(set(rows[0]))
        return collator(rows)

    spy.input_columns = collator.input_columns
    trainer = XVLMTrainer(model=model, args=args, train_dataset=dataset, data_collator=spy, eval_data_collator=spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # two logged steps, numbers
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the collator got its columns, and the column that no one reads was removed as usual
    expected = set(collator.input_columns) & set(columns)
    assert seen and all(keys == expected for keys in seen), (seen, expected)
    assert "note" not in set().union(*seen)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("as_list", [False, True], ids=["datasets", "list"])
def test_plain_trainer_with_default_arguments_fails_clearly(name, as_list, tiny_tokenizer, tmp_path):
    """A plain `Trainer` strips the raw columns: the first batch fails, naming the setting that keeps them (never a
    batch built from what is left)."""
    import datasets

    processor = _tiny_processor(tiny_tokenizer)
    collator, model, columns = _case(name, processor)
    dataset = datasets.Dataset.from_dict(columns)
    rows = [dataset[k] for k in range(len(dataset))] if as_list else dataset
    trainer = Trainer(model=model, args=_default_args(tmp_path), train_dataset=rows, data_collator=collator)
    with pytest.raises(ValueError, match=r"remove_unused_columns=False") as error:
        trainer.train()
    assert FIRST_REQUIRED[name] in str(error.value)
    assert trainer.state.global_step == 0


def test_collators_name_missing_columns(tiny_tokenizer):
    from modeling_xvlm.training import XVLMGroundingTrainCollator, XVLMNLVR2Collator, require_columns

    processor = _tiny_processor(tiny_tokenizer)
    with pytest.raises(ValueError, match=r"grounding row 1 has no text or caption, bbox column \(it has \['image'\]\)"):
        XVLMGroundingTrainCollator(processor)([{"image": _pil(0), "text": "a", "bbox": [0, 0, 4, 4]},
                                               {"image": _pil(1)}])
    with pytest.raises(ValueError, match=r"NLVR2 row 0 has no left_image, right_image, sentence column "
                                         r"\(it has \['label'\]\): .*remove_unused_columns=False"):
        XVLMNLVR2Collator(processor)([{"label": 1}])
    with pytest.raises(TypeError, match="retrieval rows must be dicts of columns, row 0 is a tuple"):
        require_columns([("image", "caption")], ["image"], "retrieval")
    require_columns([{"image": 1, "caption": "a"}], ["image", ("text", "caption")], "grounding")  # no error


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation transforms
# ----------------------------------------------------------------------------------------------------------------


def test_grounding_evaluation_collator_is_the_processor_output(tiny_tokenizer):
    from modeling_xvlm.training import XVLMGroundingCollator, XVLMGroundingTrainCollator, evaluation_collator
    from modeling_xvlm.training.collators import reseed

    processor = _tiny_processor(tiny_tokenizer)
    train = XVLMGroundingTrainCollator(processor, crop=True, randaugment=False)
    _, _, columns = _case("grounding-train", processor)
    rows = [{key: columns[key][k] for key in ("image", "text", "bbox")} for k in range(4)]
    evaluation = evaluation_collator(train)
    assert isinstance(evaluation, XVLMGroundingCollator) and train.for_evaluation().processor is processor
    plain = processor(images=[r["image"] for r in rows], text=[r["text"] for r in rows],
                      boxes=[r["bbox"] for r in rows], box_format="xywh")
    first, second = evaluation(rows), evaluation(rows)
    assert set(first) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    for key in first:
        assert torch.equal(first[key], plain[key]), key
        assert torch.equal(first[key], second[key]), key
    # labels: each box's normalised (cx, cy, w, h) in the 40 x 48 image (no crop, no flip)
    x, y, w, h = rows[0]["bbox"]
    torch.testing.assert_close(first["labels"][0], torch.tensor([(x + w / 2) / 40, (y + h / 2) / 48, w / 40, h / 48]),
                               rtol=1e-5, atol=1e-6)
    # the training batch crops (and may flip): its pixels and boxes differ from the plain ones
    reseed(train, 0)
    augmented = train(rows)
    assert augmented["pixel_values"].shape == plain["pixel_values"].shape
    assert not torch.allclose(augmented["pixel_values"], plain["pixel_values"])
    assert not torch.allclose(augmented["labels"], plain["labels"])


@pytest.mark.parametrize("name", ["retrieval", "nlvr2", "text-assignment", "vqa", "captioning", "scst"])
def test_for_evaluation_drops_only_the_training_transform(name, tiny_tokenizer):
    from modeling_xvlm.training.collators import pixel_values_from_pil

    processor = _tiny_processor(tiny_tokenizer)
    collator, _, columns = _case(name, processor)
    if name == "scst":
        from modeling_xvlm.training import captioning_train_transform

        collator.transform = captioning_train_transform(64, randaugment=False)
    rows = [{key: values[k] for key, values in columns.items()} for k in range(2)]
    evaluation = collator.for_evaluation()
    assert evaluation.transform is None and collator.transform is not None  # the training collator is unchanged
    assert type(evaluation) is type(collator) and evaluation.processor is processor
    images = [image for r in rows for image in ((r["left_image"], r["right_image"]) if name == "nlvr2" else (r["image"],))]
    plain = pixel_values_from_pil(images, processor.image_processor)
    for _ in range(2):
        pixels = evaluation(rows)["pixel_values"]
        assert torch.equal(pixels.reshape(plain.shape), plain)
    assert not torch.allclose(collator(rows)["pixel_values"].reshape(plain.shape), plain)


def test_xvlm_trainer_evaluates_grounding_without_augmentation(tiny_tokenizer, tmp_path):
    """`evaluate()` uses the evaluation collator: `eval_loss` is that of the processor's batch, every time."""
    import datasets

    from modeling_xvlm.training import XVLMTrainer

    processor = _tiny_processor(tiny_tokenizer)
    collator, model, columns = _case("grounding-train", processor)
    dataset = datasets.Dataset.from_dict(columns)
    trainer = XVLMTrainer(model=model, args=_default_args(tmp_path), eval_dataset=dataset, data_collator=collator)
    first, second = trainer.evaluate()["eval_loss"], trainer.evaluate()["eval_loss"]
    plain = processor(images=columns["image"], text=columns["text"], boxes=columns["bbox"], box_format="xywh")
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=plain["pixel_values"], input_ids=plain["input_ids"],
                         attention_mask=plain["attention_mask"], labels=plain["labels"]).loss.item()
    assert first == second
    assert first == pytest.approx(expected, rel=1e-5)
    # training batches still come from the augmenting collator
    assert trainer.data_collator is collator and trainer.eval_data_collator is not collator
