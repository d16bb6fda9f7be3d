"""Training recipe, data pipeline and ``xvlm-train`` runs (in-process and a 2-process CPU accelerate launch)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_xvlm import XVLMConfig, XVLMForGrounding, XVLMForPretraining, XVLMForRetrieval
from modeling_xvlm.training.recipe import (
    create_optimizer,
    create_scheduler,
    get_recipe,
    is_no_decay,
    linear_warmup_decay,
    new_parameter_names,
    parameter_groups,
    resolve_warmup_steps,
)

sys.path.insert(0, os.path.dirname(__file__))
from subprocess_env import offline_env  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic X-VLM dataset folder (64 train images)."""
    from modeling_xvlm.data import SyntheticConfig, write_synthetic_dataset

    out = tmp_path_factory.mktemp("xvlm_synthetic")
    write_synthetic_dataset(out, SyntheticConfig(num_train=64, num_validation=12, num_test=12), overwrite=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------


def test_no_decay_substring_rule():
    assert is_no_decay("xvlm.vision_model.encoder.layers.0.blocks.0.attention.self.relative_position_bias_table")
    assert is_no_decay("xvlm.text_model.encoder.layer.0.attention.output.LayerNorm.weight")
    assert is_no_decay("xvlm.vision_model.encoder.layers.0.blocks.0.layernorm_before.bias")  # every bias
    assert is_no_decay("xvlm.vision_model.layernorm.weight")  # contains "norm.weight"
    assert not is_no_decay("itm_head.1.weight")  # the LayerNorm inside build_mlp is decayed (official)
    assert not is_no_decay("xvlm.temp")
    assert not is_no_decay("xvlm.text_model.embeddings.word_embeddings.weight")


def test_parameter_groups_pretrain_and_finetune():
    config = XVLMConfig.from_preset("tiny")
    model = XVLMForPretraining(config)
    new = new_parameter_names(model, "pretrain")
    assert "xvlm.temp" in new and "itm_head.0.weight" in new and "bbox_head.3.bias" in new
    assert any(".crossattention." in n for n in new)
    assert "xvlm.vision_proj.weight" in new and "xvlm.text_proj.weight" in new
    assert not any("mlm_head" in n or "word_embeddings" in n for n in new)
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.01, lr_mult=2.0, new_params=new)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "decay_new", "no_decay_new"}
    assert by_name["decay"]["lr"] == 1e-4 and by_name["decay_new"]["lr"] == 2e-4
    assert by_name["no_decay"]["weight_decay"] == 0.0 and by_name["decay"]["weight_decay"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    decay_new = {names[id(p)] for p in by_name["decay_new"]["params"]}
    assert "xvlm.temp" in decay_new and "itm_head.1.weight" in decay_new
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))  # every parameter once (the tied MLM decoder is shared)
    # Fine-tuning: the official retrieval / grounding models have no init_params, so no lr_mult group.
    assert new_parameter_names(XVLMForRetrieval(config), "retrieval") == set()
    optimizer = create_optimizer(XVLMForGrounding(config), lr=3e-5, lr_mult=2.0)
    assert {g["lr"] for g in optimizer.param_groups} == {3e-5}
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-8


def test_scheduler_linear_warmup_and_decay():
    factor = linear_warmup_decay(10, 110)
    assert factor(0) == 0.0 and factor(5) == 0.5 and factor(10) == 1.0
    assert factor(60) == pytest.approx(0.5) and factor(110) == 0.0 and factor(200) == 0.0
    assert resolve_warmup_steps(0.1, 1000) == 100 and resolve_warmup_steps(2500, 10) == 2500
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = create_scheduler(optimizer, num_training_steps=20, warmup=0.25)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:6] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[-1] == pytest.approx(1 / 15)
    recipe = get_recipe("pretrain", lr=None, batch_size=8)
    assert recipe.lr == 1e-4 and recipe.batch_size == 8 and recipe.max_grad_norm == 1.0 and recipe.warmup == 2500
    assert get_recipe("retrieval").lr == 3e-5 and get_recipe("grounding").max_grad_norm is None


# ----------------------------------------------------------------------------------------------------------------
# Data pipeline
# ----------------------------------------------------------------------------------------------------------------


def test_step_batch_sampler_is_deterministic_and_resumable():
    from modeling_xvlm.training.data import StepBatchSampler

    full = StepBatchSampler(10, 2, seed=3, stream="image", rank=0, world_size=2)
    other = StepBatchSampler(10, 2, seed=3, stream="image", rank=1, world_size=2)
    assert full.steps_per_epoch == 2
    first_epoch = full.indices(0) + other.indices(0) + full.indices(1) + other.indices(1)
    assert len(set(first_epoch)) == 8  # ranks take disjoint slices; the last partial batch is dropped
    it = iter(full)
    batches = [next(it) for _ in range(5)]
    resumed = StepBatchSampler(10, 2, seed=3, stream="image", rank=0, world_size=2, start_step=3)
    assert next(iter(resumed)) == batches[3]
    assert batches[0][0][1] != batches[1][0][1]  # a fresh seed per batch
    assert full.indices(2) != full.indices(0) or full.indices(3) != full.indices(1)  # epochs are re-shuffled


def _processor(tiny_tokenizer=None, size=64):
    from modeling_xvlm.data import synthetic_tokenizer
    from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

    return XVLMProcessor(
        image_processor=XVLMImageProcessorPil(size={"height": size, "width": size}, patch_size=8),
        tokenizer=tiny_tokenizer or synthetic_tokenizer(),
    )


def test_retrieval_and_grounding_collators(rgb_image):
    from modeling_xvlm.training.collators import (
        XVLMGroundingTrainCollator,
        XVLMImageTextTransform,
        XVLMRetrievalCollator,
        reseed,
    )

    processor = _processor()
    rows = [{"image": rgb_image, "caption": "a red circle", "image_index": 0},
            {"image": rgb_image, "caption": "a small blue square on the left", "image_index": 0},
            {"image": rgb_image, "caption": "a white diamond", "image_index": 1}]
    collator = XVLMRetrievalCollator(processor, XVLMImageTextTransform(64, scale=(0.5, 1.0)))
    reseed(collator, 1)
    batch = collator(rows)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["image_ids"].tolist() == [0, 0, 1]
    assert batch["input_ids"][:, 0].tolist() == [processor.tokenizer.cls_token_id] * 3
    reseed(collator, 1)
    assert torch.equal(collator(rows)["pixel_values"], batch["pixel_values"])  # a batch is a function of its seed

    # Grounding: the box follows the flip, except for texts that mention left/right (careful hflip).
    grounding = XVLMGroundingTrainCollator(processor, crop=False, hflip_prob=1.0, randaugment=False)
    box = [4.0, 8.0, 16.0, 12.0]  # x, y, w, h on the 64 x 48 image
    out = grounding([{"image": rgb_image, "text": "the red circle", "bbox": box},
                     {"image": rgb_image, "text": "the circle on the left", "bbox": box}])
    flipped, kept = out["labels"].tolist()
    cx = (box[0] + box[2] / 2) / 64
    assert kept[0] == pytest.approx(cx) and flipped[0] == pytest.approx(1 - cx)
    assert flipped[1] == pytest.approx((box[1] + box[3] / 2) / 48) and kept[2] == pytest.approx(16 / 64)


def test_random_augment_and_crop_are_seeded(rgb_image):
    from modeling_xvlm.training.augment import RandomAugment, random_resized_crop

    a = RandomAugment()(random_resized_crop(rgb_image, 32, random.Random(5)), random.Random(7))
    b = RandomAugment()(random_resized_crop(rgb_image, 32, random.Random(5)), random.Random(7))
    assert a.size == (32, 32) and a.tobytes() == b.tobytes()
    safe = RandomAugment(box_safe=True)
    assert set(safe.ops) == {"Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness"}


# ----------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------


def test_pretrain_then_finetune_in_process(synthetic_dir, tmp_path):
    from modeling_xvlm.processing import XVLMProcessor
    from modeling_xvlm.training.train import TrainConfig, train

    torch.set_num_threads(1)
    common = dict(dataset=str(synthetic_dir), tokenizer="synthetic", batch_size=8, progress=False, cpu=True,
                  eval_max_examples=8, k_test=4, log_every=1, randaugment=True)
    pre = train(TrainConfig(task="pretrain", output_dir=str(tmp_path / "pre"), max_steps=3, iter_perc=1.0,
                            region_max_images=4, region_batch_texts=12, **common))
    assert pre["region_steps"] == 3
    losses = pre["last_losses"]
    for key in ("loss_itc", "loss_itm", "loss_mlm", "region/loss_bbox_l1", "region/loss_bbox_giou"):
        assert key in losses and losses[key] == losses[key]  # present and not NaN
    assert {"eval/txt_r1", "eval/img_r1", "eval/acc@0.5"} <= set(pre["eval"])
    reloaded = XVLMForPretraining.from_pretrained(tmp_path / "pre")
    assert reloaded.config.text_config.vocab_size == len(XVLMProcessor.from_pretrained(tmp_path / "pre").tokenizer)

    common["tokenizer"] = None
    for task in ("retrieval", "grounding"):
        out = train(TrainConfig(task=task, model=str(tmp_path / "pre"), output_dir=str(tmp_path / task),
                                max_steps=2, **common))
        assert out["steps"] == 2 and out["eval"]
    model = XVLMForGrounding.from_pretrained(tmp_path / "grounding")
    assert model.bbox_head is not None


def test_two_process_cpu_accelerate_launch(synthetic_dir, tmp_path):
    """DDP over 2 CPU processes (gloo; accelerate's multi-process launcher, the CPU is detected): a few pre-training
    steps with region batches, a checkpoint with both ranks' RNG states, and the final save."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
        "-m", "modeling_xvlm.training.train", "pretrain", "--dataset", str(synthetic_dir), "--tokenizer",
        "synthetic", "--max-steps", "3", "--batch-size", "4", "--iter-perc", "1.0", "--region-max-images", "2",
        "--region-batch-texts", "6", "--save-every", "3", "--no-eval-at-end", "--no-progress",
        "--output-dir", str(tmp_path / "ddp"),
    ]
    result = subprocess.run(cmd, env=offline_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000003" / "rng_state_1.pt").is_file()
    summary = json.loads((tmp_path / "ddp" / "train_results.json").read_text())
    assert summary["world_size"] == 2
    XVLMForPretraining.from_pretrained(tmp_path / "ddp")


def test_pretrain_from_swin_and_bert_checkpoints(synthetic_dir, tmp_path):
    """The official initialisation: Swin + BERT checkpoints, new layers get lr * lr_mult."""
    from transformers import BertConfig, BertForMaskedLM, SwinConfig, SwinModel

    from modeling_xvlm.data import synthetic_tokenizer
    from modeling_xvlm.training.train import TrainConfig, train

    tokenizer = synthetic_tokenizer()
    SwinModel(SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                         window_size=4)).save_pretrained(tmp_path / "swin")
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    summary = train(TrainConfig(
        task="pretrain", vision_model=str(tmp_path / "swin"), text_model=str(tmp_path / "bert"),
        dataset=str(synthetic_dir), max_steps=2, batch_size=4, iter_perc=1.0, region_max_images=2,
        region_batch_texts=6, output_dir=str(tmp_path / "out"), progress=False, eval_at_end=False, cpu=True,
    ))
    assert summary["steps"] == 2 and summary["region_steps"] == 2
    model = XVLMForPretraining.from_pretrained(tmp_path / "out")
    bert = BertForMaskedLM.from_pretrained(tmp_path / "bert")
    assert model.config.text_config.fusion_layer == 1
    assert model.xvlm.text_model.encoder.layer[0].attention.self.query.weight.shape == \
        bert.bert.encoder.layer[0].attention.self.query.weight.shape


def test_demo_job_smoke(synthetic_dir, tmp_path, capsys):
    """`xvlm-train` without arguments runs this job (here with a handful of steps on a small dataset)."""
    from modeling_xvlm.training.main_job import main

    out = tmp_path / "demo"
    assert main(["--dataset", str(synthetic_dir), "--output-dir", str(out), "--pretrain-steps", "2",
                 "--retrieval-steps", "1", "--grounding-steps", "1", "--batch-size", "8", "--region-images", "4",
                 "--region-texts", "12", "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "retrieval text R@1" in printed and "grounding Acc@0.5" in printed and "chance" in printed
    results = json.loads((out / "results.json").read_text())
    assert {"retrieval", "grounding", "timings_s"} <= set(results)
    XVLMForRetrieval.from_pretrained(out / "retrieval")


def test_xvlm_train_dispatcher(monkeypatch, capsys):
    """`xvlm-train` (setup.cfg entry point `modeling_xvlm.training.cli:main`): no arguments or `demo` run the demo
    job, a task name runs `train.main`; `xvlm-train TASK --help` reaches the task parser."""
    import configparser

    from modeling_xvlm.training import cli

    calls = []
    monkeypatch.setattr(cli, "demo_main", lambda argv: calls.append(("demo", list(argv))) or 0)
    monkeypatch.setattr(cli, "train_main", lambda argv: calls.append(("train", list(argv))) or 0)
    assert cli.main([]) == 0 and cli.main(["demo", "--no-regions"]) == 0 and cli.main(["nlvr2", "--cpu"]) == 0
    assert calls == [("demo", []), ("demo", ["--no-regions"]), ("train", ["nlvr2", "--cpu"])]
    assert cli.main(["--help"]) == 0 and "xvlm-train TASK" in capsys.readouterr().out
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["retrieval", "--help"])
    assert exit_info.value.code == 0 and "--k-test" in capsys.readouterr().out
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    assert "xvlm-train = modeling_xvlm.training.cli:main" in setup["options.entry_points"]["console_scripts"]
