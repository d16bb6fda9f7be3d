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
         XVLMGroundingTrainCollator(processor, crop=False, randaugment=False)),
    ):
        metrics = Trainer(model=model, args=args, eval_dataset=rows, data_collator=collator).evaluate()
        assert metrics["eval_loss"] > 0 and metrics["eval_loss"] == metrics["eval_loss"], type(model).__name__
