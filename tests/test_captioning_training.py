"""Captioning training and evaluation: caption encoding and the collators, ``transformers.Trainer``, ``xvlm-train
captioning`` / ``captioning-pretrain`` / ``captioning-scst`` (loss, resume, initialisation), ``evaluate_captioning``
and ``xvlm-eval captioning``, and SCST (OSCAR sampling, the official loss, greedy reward going up)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer

from conftest import SPECIAL_TOKENS, TINY_WORDS
from modeling_xvlm import XVLMConfig, XVLMForPretraining
from modeling_xvlm.caption_metrics import CiderD, caption_metrics, scst_sentence
from modeling_xvlm.modeling_xvlm_captioning import XVLMForConditionalGeneration, captioning_init_state
from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

pytestmark = pytest.mark.usefixtures("one_thread")

CLS, SEP, PAD = 2, 3, 0
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
CAPTIONS = {"red": ["a red circle", "a small red circle"], "blue": ["a blue square", "a large blue square"],
            "green": ["a green triangle", "a big green triangle"]}
FAST_METRICS = ("BLEU-4", "ROUGE-L", "CIDEr")  # no Java: METEOR starts a JVM (seconds)


@pytest.fixture(scope="module")
def processor() -> XVLMProcessor:
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS + TINY_WORDS)})
    return XVLMProcessor(image_processor=XVLMImageProcessorPil(size={"height": 64, "width": 64}, patch_size=8),
                         tokenizer=tokenizer)


@pytest.fixture
def no_java(monkeypatch):
    """Caption metrics as without Java: the simple tokenizer, no METEOR (fast)."""
    from modeling_xvlm.training import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "java_available", lambda: False)


def _image(colour: str, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, (48, 56, 3)), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


def _rows(n: int, captions: dict[str, list[str]] = CAPTIONS, offset: int = 0) -> list[dict]:
    names = list(COLOURS)
    return [{"image": _image(names[i % 3], i), "image_id": f"toy-{i}", "captions": list(captions[names[i % 3]])}
            for i in range(offset, offset + n)]


def _config(processor, **text) -> XVLMConfig:
    tok = processor.tokenizer
    text = {"vocab_size": len(tok), "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **text}
    return XVLMConfig.from_preset("tiny", text_config=text)


def _captioner(processor, seed: int = 0, **text) -> XVLMForConditionalGeneration:
    torch.manual_seed(seed)
    return XVLMForConditionalGeneration(_config(processor, **text))


def _save(model, processor, path) -> str:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _fit(processor, rows: list[dict], steps: int, seed: int = 0) -> XVLMForConditionalGeneration:
    """Teacher-forced caption training of a tiny captioner (no augmentation), deterministic."""
    from modeling_xvlm.training import XVLMCaptioningCollator
    from modeling_xvlm.training.collators import reseed

    model = _captioner(processor, seed).train()
    collator = XVLMCaptioningCollator(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        reseed(collator, step)
        model(**collator(rows)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def fitted(processor) -> XVLMForConditionalGeneration:
    """A captioner fitted to CAPTIONS: its captions are references."""
    return _fit(processor, _rows(6), 100)


def _pixels(processor, rows: list[dict]) -> torch.Tensor:
    return processor(images=[r["image"] for r in rows])["pixel_values"]


def _greedy_reward(model, processor, rows: list[dict], cider: CiderD) -> float:
    """Mean CIDEr-D (SCST reward) of the official greedy captions of `rows`."""
    model.eval()
    ids = model.generate(_pixels(processor, rows), input_ids=processor.caption_prompt(len(rows)), official_greedy=True)
    captions = processor.post_process_captions(ids)
    return float(cider.scst_scores(captions, [r["captions"] for r in rows]).mean())


# ----------------------------------------------------------------------------------------------------------------
# Encoding and collators
# ----------------------------------------------------------------------------------------------------------------


def test_captioning_collator_matches_the_official_tokenisation(processor):
    from modeling_xvlm.processing import pre_caption

    from modeling_xvlm.training import XVLMCaptioningCollator

    tok = processor.tokenizer
    captions = ["A red circle, on the LEFT.", "a small green triangle", " ".join(["red"] * 60)]
    rows = [{"image": _image("red"), "caption": c} for c in captions]
    batch = XVLMCaptioningCollator(processor)(rows)
    # official: tokenizer(prompt + pre_caption(caption, 40), padding='longest', truncation=True, max_length=40)
    official = tok(["a picture of " + pre_caption(c, 40) for c in captions], padding="longest", truncation=True,
                   max_length=40, return_tensors="pt")
    assert torch.equal(batch["input_ids"], official["input_ids"])
    assert torch.equal(batch["attention_mask"], official["attention_mask"])
    assert batch["input_ids"].shape == (3, 40) and batch["input_ids"][2, -1] == SEP  # truncated, [SEP] kept
    plain = XVLMCaptioningCollator(processor, prompt="")(rows[:1])
    assert plain["input_ids"][0].tolist() == tok(pre_caption(captions[0], 40))["input_ids"]  # [CLS] caption [SEP]
    with pytest.raises(ValueError, match=r"captions\[1\]"):
        XVLMCaptioningCollator(processor)([rows[0], {"image": _image("red"), "caption": "?!"}])


def _official_smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Official `LabelSmoothSoftmaxCEV1` on shifted logits: target weight 1 - s, every other class s / V."""
    logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = labels != -100
    logs = F.log_softmax(logits[keep].double(), dim=-1)
    target = torch.full_like(logs, smoothing / logs.shape[-1]).scatter(1, labels[keep][:, None], 1 - smoothing)
    return -(target * logs).sum(dim=1).mean()


def test_captioning_collator_batch(processor):
    from modeling_xvlm.training import XVLMCaptioningCollator, captioning_train_transform

    rows = [{"image": _image("red"), "caption": "a red circle"},
            {"image": _image("blue"), "caption": "a large blue square on the left"}]
    batch = XVLMCaptioningCollator(processor)(rows)  # evaluation transform
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}  # the head's argument names
    assert torch.equal(batch["pixel_values"], _pixels(processor, rows))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = batch["labels"]
    assert (labels[:, :4] == -100).all()  # [CLS] a picture of: the official prompt_length
    assert torch.equal(labels[:, 4:], ids[:, 4:].masked_fill(mask[:, 4:] == 0, -100))  # padding -100
    assert (labels[0] == -100).sum() == 4 + int((mask[0] == 0).sum()) and (mask[0] == 0).any()
    model = _captioner(processor)
    out = model(**batch)
    assert torch.allclose(out.loss.double(), _official_smoothed_loss(out.logits, labels, 0.1), atol=1e-5)
    # no prompt (captioning domain pre-training): only the padding is ignored
    plain = XVLMCaptioningCollator(processor, prompt="")(rows)
    padding = plain["attention_mask"][:, 1:] == 0
    assert torch.equal(plain["labels"][:, 1:], plain["input_ids"][:, 1:].masked_fill(padding, -100))
    # a training batch (the retrieval train_transform) has the same texts
    train = XVLMCaptioningCollator(processor, captioning_train_transform(64, randaugment=False))(rows)
    assert train["pixel_values"].shape == (2, 3, 64, 64) and torch.equal(train["labels"], labels)


def test_captioning_collator_draws_one_caption_per_image(processor):
    from modeling_xvlm.training import XVLMCaptioningCollator
    from modeling_xvlm.training.collators import reseed

    collator = XVLMCaptioningCollator(processor)
    row = {"image": _image("green"), "captions": CAPTIONS["green"]}
    drawn = []
    for seed in range(12):
        reseed(collator, seed)
        ids = collator([row])["input_ids"]
        reseed(collator, seed)
        assert torch.equal(collator([row])["input_ids"], ids)  # a function of the batch seed
        encoded = {c: processor.encode_captions([c])["input_ids"] for c in CAPTIONS["green"]}
        drawn.append(next(c for c, e in encoded.items() if torch.equal(e, ids)))
    assert set(drawn) == set(CAPTIONS["green"])
    with pytest.raises(ValueError, match="captioning row 0 has no caption"):
        collator([{"image": _image("red"), "captions": []}])
    with pytest.raises(ValueError, match="no room"):
        XVLMCaptioningCollator(processor, max_length=5)


def test_caption_records_and_scst_collator(processor):
    from modeling_xvlm.training import CaptionRecords, XVLMCaptioningSCSTCollator
    from modeling_xvlm.training.collators import reseed

    rows = [{"image": _image("red"), "image_id": "a", "captions": ["one", "two"]},
            {"image": _image("blue"), "image_id": "b", "captions": ["x", "y", "z"]}]
    records = CaptionRecords(rows)  # official: one training record per (image, caption)
    assert len(records) == 5 and [records[k]["caption"] for k in range(5)] == ["one", "two", "x", "y", "z"]
    assert records[3]["image_id"] == "b" and records[3]["captions"] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="image_id 'c'"):
        CaptionRecords([{"image": _image("red"), "image_id": "c", "captions": []}])
    rows = [{"image": _image("red"), "captions": [f"caption {w}" for w in "abcdefg"]},
            {"image": _image("blue"), "captions": ["A Blue Square.", "a large blue square"]}]
    collator = XVLMCaptioningSCSTCollator(processor)
    reseed(collator, 3)
    batch = collator(rows)
    assert set(batch) == {"pixel_values", "references", "sample_seed"}
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["sample_seed"].dtype == torch.long
    refs = batch["references"]
    assert len(refs[0]) == 5 and len(set(refs[0])) == 5 and set(refs[0]) <= set(rows[0]["captions"])  # 5 of 7
    assert sorted(refs[1]) == ["a blue square", "a large blue square"]  # all of them, pre_caption-cleaned
    reseed(collator, 3)
    again = collator(rows)
    assert again["references"] == refs and again["sample_seed"] == batch["sample_seed"]


# ----------------------------------------------------------------------------------------------------------------
# transformers.Trainer and xvlm-train captioning
# ----------------------------------------------------------------------------------------------------------------


def test_trainer_captioning_with_collator(tmp_path, processor):
    from transformers import Trainer, TrainingArguments

    from modeling_xvlm.training import XVLMCaptioningCollator, captioning_train_transform

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=4,
        per_device_eval_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        remove_unused_columns=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    collator = XVLMCaptioningCollator(processor, captioning_train_transform(64, randaugment=False))
    trainer = Trainer(model=_captioner(processor), args=args, train_dataset=_rows(4), data_collator=collator)
    assert math.isfinite(trainer.train().training_loss)
    trainer.data_collator = XVLMCaptioningCollator(processor)  # evaluation transform
    assert math.isfinite(trainer.evaluate(eval_dataset=_rows(4, offset=4))["eval_loss"])


def _common(tmp_path, name, **extra):
    values = dict(task="captioning", batch_size=4, progress=False, cpu=True, log_every=1,
                  output_dir=str(tmp_path / name), eval_batch_size=4, randaugment=False)
    values.update(extra)
    return values


def test_train_captioning_loss_goes_down(tmp_path, processor):
    from modeling_xvlm.training.train import TrainConfig, train

    messages: list[str] = []
    model = _save(_captioner(processor), processor, tmp_path / "init")
    summary = train(TrainConfig(model=model, max_steps=6, lr=3e-3, eval_at_end=False, save_final=False,
                                **_common(tmp_path, "loss")), data={("retrieval", "train"): _rows(3)},
                    log=messages.append)
    losses = [float(m) for m in re.findall(r"step \d+/6: loss ([0-9.e+-]+)", "\n".join(messages))]
    assert len(losses) == 6 and summary["steps"] == 6
    assert losses[-1] < 0.9 * losses[0], losses


def test_train_captioning_eval_and_resume(tmp_path, processor, no_java):
    from modeling_xvlm.training.train import TrainConfig, train

    data = {("retrieval", "train"): _rows(6), ("retrieval", "validation"): _rows(3, offset=6)}
    common = _common(tmp_path, "cap", model="tiny", tokenizer="synthetic", max_steps=3, save_every=2)
    summary = train(TrainConfig(**common), data=data)
    assert summary["steps"] == 3 and math.isfinite(summary["last_losses"]["loss"])
    assert set(summary["eval"]) == {"eval/BLEU-4", "eval/ROUGE-L", "eval/CIDEr"}  # no Java: no METEOR
    assert all(0.0 <= v <= 10.0 for v in summary["eval"].values())
    model = XVLMForConditionalGeneration.from_pretrained(tmp_path / "cap")
    from modeling_xvlm.data import synthetic_tokenizer

    tok = synthetic_tokenizer()
    assert (model.config.text_config.bos_token_id, model.config.text_config.eos_token_id) == (
        tok.cls_token_id, tok.sep_token_id)
    assert model.config.text_config.vocab_size == len(tok) and model.config.label_smoothing == 0.1
    # resume from the step-2 checkpoint: the final weights equal the uninterrupted run's
    resumed = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "cap-resumed"), "eval_at_end": False,
                                   "resume": str(tmp_path / "cap" / "checkpoints" / "step-00000002")}), data=data)
    assert resumed["steps"] == 3
    again = XVLMForConditionalGeneration.from_pretrained(tmp_path / "cap-resumed")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_train_captioning_from_pretraining_folder_and_pretrain_task(tmp_path, processor):
    from modeling_xvlm.training.train import TrainConfig, train

    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(processor.tokenizer)})
    pretrained = XVLMForPretraining(config)
    source = _save(pretrained, processor, tmp_path / "pre")
    summary = train(TrainConfig(**_common(tmp_path, "ft", model=source, lr=0.0, max_steps=1, eval_at_end=False)),
                    data={("retrieval", "train"): _rows(4)})
    assert summary["steps"] == 1
    model = XVLMForConditionalGeneration.from_pretrained(tmp_path / "ft")
    # lr 0: the official pre-training -> captioning initialisation (text_encoder.* -> text_decoder.*)
    expected = captioning_init_state(pretrained.state_dict())
    state = model.state_dict()
    for key in ("text_decoder.text_model.encoder.layer.0.attention.self.query.weight",
                "vision_model.embeddings.patch_embeddings.projection.weight"):
        assert torch.equal(state[key], expected[key]), key
    assert model.config.text_config.eos_token_id == processor.tokenizer.sep_token_id  # set from the tokenizer
    # the captioning domain pre-training: pretrain image-text rows, no prompt, no label smoothing
    rows = [{"image_id": str(i), "image": r["image"], "captions": r["captions"], "objects": []} for i, r in
            enumerate(_rows(4))]
    summary = train(TrainConfig(**_common(tmp_path, "capt-pre", task="captioning-pretrain", model=source,
                                          max_steps=1)), data={("pretrain", "train"): rows})
    assert summary["eval"] == {} and summary["recipe"]["max_grad_norm"] == 1.0
    assert XVLMForConditionalGeneration.from_pretrained(tmp_path / "capt-pre").config.label_smoothing == 0.0
    assert XVLMProcessor.from_pretrained(tmp_path / "capt-pre").prompt == ""  # saved: xvlm-eval captions from [CLS]
    assert XVLMProcessor.from_pretrained(tmp_path / "ft").prompt == "a picture of "
    with pytest.raises(SystemExit, match="captioning-scst starts from a captioner"):
        train(TrainConfig(**_common(tmp_path, "scst", task="captioning-scst", model=source, max_steps=1)),
              data={("retrieval", "train"): _rows(4)})


def test_captioning_recipes_and_parser():
    from modeling_xvlm.training.recipe import get_recipe, new_parameter_names
    from modeling_xvlm.training.train import build_parser, config_from_args

    def values(task):
        r = get_recipe(task)
        return r.lr, r.lr_mult, r.weight_decay, r.epochs, r.warmup, r.batch_size, r.max_grad_norm

    assert values("captioning") == (1e-5, 2.0, 0.01, 5, 0.1, 32, None)  # configs/Captioning.yaml
    assert values("captioning-pretrain") == (3e-5, 2.0, 0.01, 2, 0.1, 128, 1.0)  # Captioning_pretrain_O1.yaml
    assert values("captioning-scst") == (1e-5, 2.0, 0.01, 5, 0.1, 8, None)  # Captioning_scst.yaml
    assert get_recipe("captioning-scst").extra["num_samples"] == 5
    tasks = ("captioning", "captioning-pretrain", "captioning-scst")
    assert not any(get_recipe(t).new_params_get_lr_mult for t in tasks)
    model = XVLMForConditionalGeneration(XVLMConfig.from_preset("tiny"))
    assert new_parameter_names(model, "captioning") == set()  # official init_params is empty: lr_mult has no effect
    cfg = config_from_args(build_parser().parse_args(
        ["captioning-scst", "--model", "out/cap", "--scst-samples", "3", "--cider-document-frequencies", "df.p"]))
    assert (cfg.task, cfg.scst_samples, cfg.cider_document_frequencies, cfg.prompt) == (
        "captioning-scst", 3, "df.p", None)
    cfg = config_from_args(build_parser().parse_args(["captioning", "--prompt", "", "--label-smoothing", "0"]))
    assert (cfg.prompt, cfg.label_smoothing) == ("", 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def test_evaluate_captioning_results_and_metrics(processor, monkeypatch):
    from modeling_xvlm.training import evaluate as evaluate_module
    from modeling_xvlm.training import evaluate_captioning

    model = _captioner(processor, seed=1).eval()
    rows = _rows(4)
    rows.append({**rows[1], "image": _image("green", 9)})  # a duplicate image_id: the first row's caption is kept
    m = evaluate_captioning(model, processor, rows, batch_size=2, metrics=FAST_METRICS, metrics_tokenizer="simple")
    generated = model.generate(_pixels(processor, rows[:4]), input_ids=processor.caption_prompt(4))
    expected = processor.post_process_captions(generated)
    assert m["results"] == [{"image_id": f"toy-{i}", "caption": c} for i, c in enumerate(expected)]
    assert m["num_examples"] == 5 and m["num_images"] == 4
    reference = caption_metrics({f"toy-{i}": c for i, c in enumerate(expected)},
                                {r["image_id"]: r["captions"] for r in rows[:4]}, FAST_METRICS, "simple")
    for name in FAST_METRICS:
        assert m[name] == pytest.approx(reference[name]) and 0.0 <= m[name] <= 10.0
    assert "METEOR" not in m and m["metrics_note"] is None
    # without Java: the simple tokenizer and no METEOR, said in metrics_note
    monkeypatch.setattr(evaluate_module, "java_available", lambda: False)
    m = evaluate_captioning(model, processor, rows[:2], max_examples=1)
    assert set(m) >= {"BLEU-4", "ROUGE-L", "CIDEr"} and "METEOR" not in m and m["metrics_tokenizer"] == "simple"
    assert "Java not found" in m["metrics_note"] and "METEOR skipped" in m["metrics_note"] and m["num_examples"] == 1
    # COCO file names give numeric ids; rows without captions give no metrics
    coco = [{"image": _image("red"), "image_id": "val2014/COCO_val2014_000000391895.jpg", "captions": []}]
    m = evaluate_captioning(model, processor, coco, generate_kwargs={"num_beams": 1, "max_length": 8})
    assert [r["image_id"] for r in m["results"]] == [391895] and "CIDEr" not in m
    with pytest.raises(ValueError, match="no captioning rows"):
        evaluate_captioning(model, processor, [])


def test_evaluate_captioning_fitted_model_and_baselines(processor, fitted):
    from modeling_xvlm.training import evaluate_captioning
    from modeling_xvlm.training.evaluate import most_frequent_caption

    rows = _rows(3, offset=6)
    train_rows = _rows(6) + [{"image": _image("red"), "image_id": "x", "captions": ["A red circle."]}]
    m = evaluate_captioning(fitted, processor, rows, metrics=FAST_METRICS, metrics_tokenizer="simple",
                            train_dataset=train_rows)
    for result, row in zip(m["results"], rows):
        assert result["caption"] in row["captions"], result  # the fitted captioner gives a reference caption
    assert m["CIDEr"] > 2.0 and m["ROUGE-L"] == pytest.approx(1.0)  # (3-word captions have no 4-gram: BLEU-4 ~ 0)
    assert most_frequent_caption([r["captions"] for r in train_rows]) == "a red circle"  # pre_caption-cleaned
    constant = m["baselines"]["constant"]
    assert constant["caption"] == "a red circle" and constant["CIDEr"] < m["CIDEr"]
    # the colour histogram finds a training image of the same colour: its first caption
    nearest = m["baselines"]["nearest_neighbour"]
    assert nearest["CIDEr"] == pytest.approx(
        caption_metrics({r["image_id"]: r["captions"][0] for r in rows}, {r["image_id"]: r["captions"] for r in rows},
                        FAST_METRICS, "simple")["CIDEr"])


def test_xvlm_eval_captioning_result_file(tmp_path, processor, fitted, monkeypatch, capsys, no_java):
    from modeling_xvlm.training import evaluate as evaluate_module

    folder = _save(fitted, processor, tmp_path / "m")
    splits = {"test": _rows(3, offset=6), "train": _rows(6)}
    calls = []
    monkeypatch.setattr(evaluate_module, "load_xvlm_dataset",
                        lambda dataset, config, split: calls.append((config, split)) or splits[split])
    out, metrics_file = tmp_path / "result.json", tmp_path / "metrics.json"
    assert evaluate_module.main(["captioning", "--model", folder, "--device", "cpu", "--output", str(out),
                                 "--metrics-output", str(metrics_file), "--num-beams", "2", "--max-length", "12"]) == 0
    assert calls == [("retrieval", "test"), ("retrieval", "train")]  # captioning data are retrieval rows
    result = json.loads(out.read_text())  # the official result file
    assert [r["image_id"] for r in result] == ["toy-6", "toy-7", "toy-8"]
    assert all(set(r) == {"image_id", "caption"} for r in result)
    metrics = json.loads(metrics_file.read_text())
    assert metrics["generate_kwargs"] == {"num_beams": 2, "max_length": 12} and metrics["CIDEr"] > 2.0
    printed = capsys.readouterr().out
    assert "CIDEr" in printed and "constant caption" in printed and "Java not found" in printed


# ----------------------------------------------------------------------------------------------------------------
# SCST
# ----------------------------------------------------------------------------------------------------------------


def _oscar_sampling(decoder, prompt, image, generator, max_length, eos=SEP, pad=PAD):
    """Independent reference of OSCAR's `_generate_no_beam_search(do_sample=True)`: full recompute each step."""
    ids, open_rows, logprobs, masks = prompt, torch.ones(len(prompt), dtype=torch.long), [], []
    while ids.shape[1] < max_length:
        logits = decoder(input_ids=ids, encoder_hidden_states=image, use_cache=False).logits[:, -1].float()
        token = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
        logprobs.append(F.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1))
        masks.append(open_rows)
        token = token * open_rows + pad * (1 - open_rows)
        ids = torch.cat([ids, token[:, None]], 1)
        open_rows = open_rows * (token != eos).long()
        if open_rows.max() == 0:
            break
    if ids.shape[1] == max_length:
        ids[:, -1].masked_fill_(open_rows.bool(), eos)
    mask = torch.stack(masks, 1).float()
    return ids, (torch.stack(logprobs, 1) * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("sep_bias", [3.0, -50.0])  # 3: most samples end early; -50: none, [SEP] is forced
def test_sample_captions_is_oscar_sampling(processor, sep_bias):
    from modeling_xvlm.training import sample_captions

    model = _captioner(processor, seed=2, initializer_range=0.2).eval()
    with torch.no_grad():
        model.text_decoder.lm_head.decoder.bias[SEP] += sep_bias
    image = model.encode_image(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))).last_hidden_state
    image = image.repeat_interleave(3, 0)
    prompt = processor.caption_prompt(6)
    ids, logprobs = sample_captions(model.text_decoder, prompt, image, eos_token_id=SEP, max_length=12,
                                    generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_ids, ref_logprobs = _oscar_sampling(model.text_decoder, prompt, image, torch.Generator().manual_seed(5), 12)
    width = ref_ids.shape[1]
    assert ids.shape == (6, 12) and torch.equal(ids[:, :width], ref_ids) and (ids[:, width:] == PAD).all()
    assert torch.allclose(logprobs, ref_logprobs, atol=1e-5) and logprobs.requires_grad
    if sep_bias < 0:
        assert (ids[:, -1] == SEP).all()
    else:  # the mean log-probability of the sampled tokens up to [SEP] = a teacher-forced recomputation
        logits = model.text_decoder(input_ids=ids, encoder_hidden_states=image).logits
        logs = F.log_softmax(logits[:, 3:-1].float(), -1).gather(2, ids[:, 4:, None]).squeeze(2)
        checked = 0
        for row in range(6):
            tokens = ids[row, 4:].tolist()
            n = tokens.index(SEP) + 1
            if n < len(tokens):  # finished before max_length (a [SEP] there may replace the sampled token)
                assert logprobs[row].item() == pytest.approx(logs[row, :n].mean().item(), abs=1e-5)
                checked += 1
        assert checked >= 2


def test_scst_loss_equals_the_official_criterion():
    from modeling_xvlm.training import scst_loss

    cider = CiderD([CAPTIONS[c] for c in COLOURS] + [["a dog on the grass", "a small dog"]])
    refs = [CAPTIONS["red"], CAPTIONS["blue"]]
    samples = ["a red circle.", "a red square", "a circle", "a blue square", "blue", "a large blue square"]
    greedy = ["a red", "a blue square"]
    logprobs = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.25], requires_grad=True)
    # official ScstRewardCriterion: one CIDEr-D call on samples + greedy, gt_idx, greedy baseline per image
    gen = samples + greedy
    gt_idx = [i // 3 for i in range(6)] + [0, 1]
    scores = cider.scores([s.strip().removesuffix(".") + " <eos>" for s in gen],
                          [[r + " <eos>" for r in refs[i]] for i in gt_idx])
    reward = scores[:6].reshape(2, 3) - scores[-2:][:, None]
    expected = (-logprobs.detach().double() * torch.tensor(reward.reshape(6))).mean()
    loss = scst_loss(logprobs, cider.scst_scores(samples, [refs[i // 3] for i in range(6)]),
                     cider.scst_scores(greedy, refs))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert scst_sentence("a red circle.") == "a red circle <eos>"
    loss.backward()  # d loss / d logprob_i = -(reward_i - baseline) / N
    assert torch.allclose(logprobs.grad.double(), -torch.tensor(reward.reshape(6)) / 6, atol=1e-6)
    with pytest.raises(ValueError, match="whole number per image"):
        scst_loss(logprobs, np.zeros(6), np.zeros(4))


def test_scst_iteration(processor):
    from modeling_xvlm.training import XVLMSelfCriticalCaptioning, sample_captions, scst_document_frequencies, scst_loss

    model = _captioner(processor, seed=3, initializer_range=0.2)
    cider = CiderD(scst_document_frequencies([CAPTIONS[c] for c in COLOURS]))
    scst = XVLMSelfCriticalCaptioning(model, processor, cider, num_samples=2, max_length=10).train()
    rows = _rows(2)
    pixels = _pixels(processor, rows)
    out = scst(pixels, [r["captions"] for r in rows], torch.tensor(11))
    assert model.training  # the greedy baseline ran in eval mode, training mode is back
    prompt = processor.caption_prompt(2)
    greedy = model.eval().generate(pixels, input_ids=prompt, official_greedy=True, max_length=10)
    assert out.greedy == processor.post_process_captions(greedy)
    image = model.encode_image(pixels).last_hidden_state.repeat_interleave(2, 0)
    ids, logprobs = sample_captions(model.text_decoder, prompt.repeat_interleave(2, 0), image, eos_token_id=SEP,
                                    max_length=10, generator=torch.Generator().manual_seed(11))
    assert out.samples == processor.post_process_captions(ids) and len(out.samples) == 4
    assert torch.allclose(out.sample_logprobs, logprobs, atol=1e-6)
    refs = [r["captions"] for r in rows]
    expected = scst_loss(logprobs, cider.scst_scores(out.samples, [refs[0]] * 2 + [refs[1]] * 2),
                         cider.scst_scores(out.greedy, refs))
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.reward_sample.item() == pytest.approx(float(out.sample_rewards.mean()))
    out.loss.backward()
    assert model.text_decoder.lm_head.decoder.bias.grad is not None
    with pytest.raises(ValueError, match="1 reference lists for 2 images"):
        scst(pixels, refs[:1])


def test_scst_raises_the_greedy_reward(tmp_path, processor):
    """A captioner fitted to captions that mostly say "shape" gets SCST rewards from references that name the
    shape: a few SCST steps make its greedy captions name it (greedy CIDEr-D up)."""
    from modeling_xvlm.training import scst_document_frequencies
    from modeling_xvlm.training.train import TrainConfig, train

    mostly_shape = {c: [f"a {c} shape", f"a {c} shape", CAPTIONS[c][0]] for c in COLOURS}
    start = _fit(processor, _rows(6, mostly_shape), 100)
    rows = _rows(6)
    cider = CiderD(scst_document_frequencies([r["captions"] for r in rows]))
    before = _greedy_reward(start, processor, rows[:3], cider)
    messages: list[str] = []
    folder = _save(start, processor, tmp_path / "start")
    summary = train(TrainConfig(**_common(tmp_path, "scst", task="captioning-scst", model=folder, batch_size=3,
                                          lr=3e-3, warmup=0, max_steps=3, eval_at_end=False)),
                    data={("retrieval", "train"): rows}, log=messages.append)
    assert summary["steps"] == 3 and "reward_greedy" in summary["last_losses"]
    after = _greedy_reward(XVLMForConditionalGeneration.from_pretrained(tmp_path / "scst"), processor, rows[:3], cider)
    assert after > before + 1.0, (before, after)


def test_train_scst_resume(tmp_path, processor, no_java):
    from modeling_xvlm.training.train import TrainConfig, train

    data = {("retrieval", "train"): _rows(4), ("retrieval", "validation"): _rows(2, offset=4)}
    # dropout on: the resumed run must also continue the global RNG (restored from the checkpoint)
    start = _save(_captioner(processor, hidden_dropout_prob=0.1), processor, tmp_path / "start")
    common = _common(tmp_path, "scst", task="captioning-scst", model=start, batch_size=2, max_steps=3, save_every=2,
                     scst_samples=2)
    summary = train(TrainConfig(**common), data=data)
    assert summary["steps"] == 3 and set(summary["eval"]) == {"eval/BLEU-4", "eval/ROUGE-L", "eval/CIDEr"}
    model = XVLMForConditionalGeneration.from_pretrained(tmp_path / "scst")  # the captioner, not the SCST wrapper
    resumed = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "scst-resumed"), "eval_at_end": False,
                                   "resume": str(tmp_path / "scst" / "checkpoints" / "step-00000002")}), data=data)
    assert resumed["steps"] == 3
    again = XVLMForConditionalGeneration.from_pretrained(tmp_path / "scst-resumed")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
