"""Hub workflows: Auto-class round trips of every class, the file set `save_pretrained` writes (what `push_to_hub`
uploads) and the model-card generator."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
    pipeline,
)

import modeling_xvlm
from modeling_xvlm import (
    XVLMConfig,
    XVLMForConditionalGeneration,
    XVLMForGrounding,
    XVLMForPretraining,
    XVLMForQuestionAnswering,
    XVLMForRetrieval,
    XVLMModel,
    create_model_card,
)
from modeling_xvlm.hub import (
    GENERATIVE_AUTO_CLASS,
    GENERATIVE_HEADS,
    generative_heads,
    load_eval_results,
    register_xvlm,
)
from modeling_xvlm.processing import XVLMImageProcessor, XVLMImageProcessorPil, XVLMProcessor
from modeling_xvlm.tasks import BASE_MODEL, TASKS, all_rows, task_of

PACKAGE_DIR = Path(modeling_xvlm.__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_processor(tokenizer, config) -> XVLMProcessor:
    size = config.image_size
    image_processor = XVLMImageProcessorPil(size={"height": size, "width": size}, patch_size=config.patch_stride)
    return XVLMProcessor(image_processor, tokenizer)


# (model class, the Auto class that loads it locally, or None for "load it with its own class")
MODEL_CASES = [
    (XVLMModel, AutoModel),
    (XVLMForRetrieval, AutoModelForZeroShotImageClassification),
    (XVLMForPretraining, AutoModelForPreTraining),
    (XVLMForGrounding, AutoModelForZeroShotObjectDetection),
    (XVLMForQuestionAnswering, AutoModelForVisualQuestionAnswering),
    (XVLMForConditionalGeneration, AutoModelForImageTextToText),
]


def test_registration_is_idempotent_and_complete() -> None:
    first = register_xvlm()
    assert register_xvlm() == first
    assert first["XVLMConfig"] == "AutoConfig"
    for row in all_rows():
        name = row.model_class.__name__
        assert first[name] == row.remote_auto_class
        assert getattr(modeling_xvlm, name) is row.model_class
        assert row.model_class._auto_class == row.remote_auto_class
    assert XVLMConfig._auto_class == "AutoConfig"
    assert {XVLMProcessor.__name__, XVLMImageProcessorPil.__name__} <= first.keys()


def test_task_table_matches_the_classes() -> None:
    """The Auto classes of `MODEL_CASES` (what loads each class locally) are the task table's."""
    for model_class, auto_class in MODEL_CASES:
        row = task_of(model_class)
        assert row.auto_class == (auto_class.__name__ if auto_class else None)
    assert task_of(XVLMModel) is BASE_MODEL and task_of("XVLMForRetrieval") is TASKS["retrieval"]
    assert set(TASKS) == {"pretrain", "retrieval", "grounding", "vqa", "captioning", "nlvr2", "nlvr2-pretrain"}
    with pytest.raises(KeyError):
        task_of("BertModel")


def test_package_exports_processors() -> None:
    from modeling_xvlm import XVLMImageProcessor as ImageProcessor, XVLMProcessor as Processor

    assert ImageProcessor is XVLMImageProcessor and Processor is XVLMProcessor
    for name in ("XVLMProcessor", "XVLMImageProcessor", "XVLMImageProcessorPil", "XVLMTextLMHeadModel"):
        assert name in modeling_xvlm.__all__ and hasattr(modeling_xvlm, name)


@pytest.mark.parametrize("model_class,auto_class", MODEL_CASES, ids=lambda c: getattr(c, "__name__", "direct"))
def test_model_auto_round_trip(model_class, auto_class, tiny_config, tiny_inputs, tmp_path) -> None:
    model = model_class(tiny_config).eval()
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is XVLMConfig and config.to_dict()["text_config"] == tiny_config.to_dict()["text_config"]
    loader = auto_class or model_class
    reloaded = loader.from_pretrained(tmp_path).eval()
    assert type(reloaded) is model_class
    state, state2 = model.state_dict(), reloaded.state_dict()
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    with torch.no_grad():
        if model_class is XVLMForGrounding:
            a, b = model(**tiny_inputs).pred_boxes, reloaded(**tiny_inputs).pred_boxes
        elif model_class is XVLMForPretraining:
            a = model.xvlm(**tiny_inputs).logits_per_image
            b = reloaded.xvlm(**tiny_inputs).logits_per_image
        elif model_class is XVLMForQuestionAnswering:
            answers = tiny_inputs["input_ids"].clone()
            a, b = model(**tiny_inputs, labels=answers).logits, reloaded(**tiny_inputs, labels=answers).logits
        elif model_class is XVLMForConditionalGeneration:
            a, b = model(**tiny_inputs).logits, reloaded(**tiny_inputs).logits
        else:
            a, b = model(**tiny_inputs).logits_per_image, reloaded(**tiny_inputs).logits_per_image
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Every head checkpoint also loads as the base model (feature extraction).
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is XVLMModel


def test_processor_auto_round_trip(tiny_tokenizer, tiny_config, rgb_image, tmp_path) -> None:
    processor = tiny_processor(tiny_tokenizer, tiny_config)
    processor.save_pretrained(tmp_path)
    auto_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(auto_processor) is XVLMProcessor
    expected = processor(images=rgb_image, text=["a red circle"])
    got = auto_processor(images=rgb_image, text=["a red circle"])
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(expected[key], got[key], rtol=0, atol=0)
    # Image processors: both backends through AutoImageProcessor, PIL by default (the parity backend).
    backends = ((None, XVLMImageProcessorPil), ("pil", XVLMImageProcessorPil), ("torchvision", XVLMImageProcessor))
    for backend, cls in backends:
        kwargs = {} if backend is None else {"backend": backend}
        image_processor = AutoImageProcessor.from_pretrained(tmp_path, **kwargs)
        assert type(image_processor) is cls
        assert image_processor.input_size == (tiny_config.image_size, tiny_config.image_size)
    pil = AutoImageProcessor.from_pretrained(tmp_path)
    torch.testing.assert_close(
        pil(rgb_image, return_tensors="pt")["pixel_values"], expected["pixel_values"], rtol=0, atol=0
    )
    tv = XVLMImageProcessor(size={"height": tiny_config.image_size, "width": tiny_config.image_size})
    tv.save_pretrained(tmp_path / "tv")
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "tv", backend="torchvision")) is XVLMImageProcessor


def _sibling_closure(start: Path) -> set[str]:
    """File names a module needs when copied flat: itself plus its `from .x import` siblings, recursively."""
    todo, seen = [start], set()
    while todo:
        path = todo.pop()
        if path.name in seen:
            continue
        seen.add(path.name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(path.parent / f"{node.module}.py")
    return seen


def test_saved_file_set_is_what_push_to_hub_uploads(tiny_tokenizer, tiny_config, tmp_path) -> None:
    """`push_to_hub` uploads exactly what `save_pretrained` writes; pin that set for a retrieval checkpoint."""
    model = XVLMForRetrieval(tiny_config)
    processor = tiny_processor(tiny_tokenizer, tiny_config)
    model.save_pretrained(tmp_path, push_to_hub=False)
    processor.save_pretrained(tmp_path, push_to_hub=False)
    create_model_card("org/xvlm-tiny-retrieval", model).save(tmp_path / "README.md")

    # The head's own module (modeling_xvlm_retrieval.py) and everything it imports from its siblings.
    code = _sibling_closure(PACKAGE_DIR / "modeling_xvlm_retrieval.py")
    code |= _sibling_closure(PACKAGE_DIR / "configuration_xvlm.py")
    processor_flat = XVLMProcessor._auto_class is not None
    if processor_flat:
        processing_dir = Path(modeling_xvlm.processing.__file__).parent
        code |= _sibling_closure(processing_dir / "processing_xvlm.py")
        code |= _sibling_closure(processing_dir / "image_processing_xvlm.py")
    expected = {
        "README.md",
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        *code,
    }
    files = {p.name for p in tmp_path.iterdir()}
    assert files == expected
    assert {
        "modeling_xvlm_retrieval.py",
        "modeling_xvlm.py",
        "modeling_xvlm_text.py",
        "attention.py",
        "configuration_xvlm.py",
        "retrieval.py",
    } <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_xvlm.XVLMConfig",
        "AutoModel": "modeling_xvlm.XVLMModel",  # AutoModel is the base model of every checkpoint
        "AutoModelForZeroShotImageClassification": "modeling_xvlm_retrieval.XVLMForRetrieval",
    }
    assert config["architectures"] == ["XVLMForRetrieval"]
    if processor_flat:
        processor_config = json.loads((tmp_path / "processor_config.json").read_text())
        assert processor_config["auto_map"]["AutoProcessor"] == "processing_xvlm.XVLMProcessor"
        image_config = processor_config["image_processor"]
        assert image_config["auto_map"]["AutoImageProcessor"] == "image_processing_xvlm.XVLMImageProcessorPil"


def test_grounding_checkpoint_auto_map(tiny_config, tmp_path) -> None:
    XVLMForGrounding(tiny_config).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_xvlm.XVLMConfig",
        "AutoModel": "modeling_xvlm.XVLMModel",
        "AutoModelForZeroShotObjectDetection": "modeling_xvlm_grounding.XVLMForGrounding",
    }
    assert {"modeling_xvlm_grounding.py", "modeling_xvlm.py", "box_ops.py"} <= set(os.listdir(tmp_path))
    # Locally as through remote code: AutoModel is the base model, the head loads with its task Auto class.
    assert type(AutoModel.from_pretrained(tmp_path)) is XVLMModel
    assert type(AutoModelForZeroShotObjectDetection.from_pretrained(tmp_path)) is XVLMForGrounding


def test_image_text_to_text_maps_both_generative_heads(tiny_config, tmp_path) -> None:
    """AutoModelForImageTextToText (transformers' image-text-to-text pipeline) has one entry for XVLMConfig: both
    generative heads, picked by `config.architectures`, captioning first (the default)."""
    assert GENERATIVE_AUTO_CLASS == "AutoModelForImageTextToText"
    assert generative_heads() == (XVLMForConditionalGeneration, XVLMForQuestionAnswering)
    assert AutoModelForImageTextToText._model_mapping[XVLMConfig] == generative_heads()
    # every row that names this Auto class is one of the heads (the loop of register_xvlm skips them)
    assert {n for n, row in TASKS.items() if row.auto_class == GENERATIVE_AUTO_CLASS} <= set(GENERATIVE_HEADS)
    # the VQA head keeps its own Auto class as well
    assert AutoModelForVisualQuestionAnswering._model_mapping[XVLMConfig] is XVLMForQuestionAnswering
    for architectures, head in (
        (["XVLMForConditionalGeneration"], XVLMForConditionalGeneration),
        (["XVLMForQuestionAnswering"], XVLMForQuestionAnswering),
        (["XVLMForPretraining"], XVLMForConditionalGeneration),  # names neither head: the default
    ):
        tiny_config.architectures = architectures
        assert type(AutoModelForImageTextToText.from_config(tiny_config)) is head
    for head in generative_heads():
        head(tiny_config).save_pretrained(tmp_path / head.__name__)
        assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / head.__name__)) is head
    register_xvlm()  # idempotent: the entry stays
    assert AutoModelForImageTextToText._model_mapping[XVLMConfig] == generative_heads()


def test_captioning_head_keeps_its_generation_config(tiny_config, tmp_path) -> None:
    """The official decoding settings (3 beams, total lengths 5 to 20) are the head's generation_config.json."""
    model = XVLMForConditionalGeneration(tiny_config)
    model.generation_config.num_beams = 2
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert (saved["num_beams"], saved["max_length"], saved["min_length"]) == (2, 20, 5)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_xvlm_captioning.XVLMForConditionalGeneration"
    assert {"modeling_xvlm_captioning.py", "official_generation.py"} <= set(os.listdir(tmp_path))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(reloaded) is XVLMForConditionalGeneration
    config = reloaded.generation_config
    assert (config.num_beams, config.max_length, config.min_length) == (2, 20, 5)


def test_vqa_head_is_the_image_text_to_text_class_and_keeps_its_generation_config(tiny_config, tiny_inputs,
                                                                                  tmp_path) -> None:
    """transformers' image-text-to-text pipeline loads AutoModelForImageTextToText: the VQA head for a VQA
    folder, whose generation settings (generation_config.json) survive a save / load."""
    tiny_config.text_config.bos_token_id, tiny_config.text_config.eos_token_id = 2, 3
    model = XVLMForQuestionAnswering(tiny_config).eval()
    assert model.can_generate() and model.generation_config.max_new_tokens == 10
    assert len(model.generate(**tiny_inputs)[0]) <= 1 + 10
    model.generation_config.max_new_tokens = 3
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 3
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForVisualQuestionAnswering"] == "modeling_xvlm_vqa.XVLMForQuestionAnswering"
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is XVLMForQuestionAnswering and reloaded.generation_config.max_new_tokens == 3
    generated = reloaded.generate(**tiny_inputs)
    assert generated.shape[1] <= 1 + 3
    assert torch.equal(generated, model.generate(**tiny_inputs))
    longer = model.generate(**tiny_inputs, max_new_tokens=5)
    assert torch.equal(longer, reloaded.generate(**tiny_inputs, max_new_tokens=5))


# ------------------------------------------------------------------------------------------------ model cards


def test_model_card_metadata_and_sections(tiny_config, tmp_path) -> None:
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(
        json.dumps(
            {
                "task": "retrieval",
                "dataset": "coco",
                "split": "test",
                "metrics": {"txt_r1": 81.2, "img_r1": 63.4, "r_mean": 86.1},
            }
        )
    )
    card = create_model_card(
        "org/xvlm-base-coco-retrieval",
        XVLMForRetrieval(tiny_config),
        base_model="org/xvlm-base-4m",
        datasets=["coco"],
        eval_results=eval_file,
    )
    card.save(tmp_path / "README.md")
    reloaded = ModelCard.load(tmp_path / "README.md")
    data = reloaded.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "zero-shot-image-classification"
    assert data["base_model"] == "org/xvlm-base-4m"
    assert data["datasets"] == ["coco"]
    assert data["license"] == "bsd-3-clause"
    assert set(data["metrics"]) == {"txt_r1", "img_r1", "r_mean"}
    assert {"x-vlm", "custom_code"} <= set(data["tags"])
    results = {r.metric_type: r for r in reloaded.data.eval_results}
    assert results["txt_r1"].metric_value == pytest.approx(81.2)
    assert results["r_mean"].dataset_name == "coco" and results["r_mean"].dataset_split == "test"
    assert results["img_r1"].task_type == "image-text-retrieval"
    text = reloaded.text
    for section in ("## Intended use", "## How to use", "## Evaluation", "## Citation", "## Training"):
        assert section in text
    assert "Image retrieval R@1" in text and "63.40" in text
    assert "2111.08276" in text and "Zeng" in text
    assert "org/xvlm-base-coco-retrieval" in text and "trust_remote_code=True" in text


def test_model_card_grounding_and_flat_official_results(tiny_config) -> None:
    card = create_model_card(
        "org/xvlm-refcoco", XVLMForGrounding(tiny_config), eval_results={"val_d": 85.1, "testA_d": 89.0}
    )
    assert card.data.pipeline_tag == "zero-shot-object-detection"
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["testA_d"].task_type == "visual-grounding"
    assert "base_model" not in card.data.to_dict() or card.data.base_model is None
    assert "visual-grounding" in card.text


def test_model_card_vqa(tiny_config) -> None:
    # as `xvlm-eval vqa --metrics_output` writes them
    metrics = {"task": "vqa", "model": "org/xvlm-base-vqa", "dataset": "vqa_v2", "split": "minival",
               "vqa_accuracy": 75.4, "exact_match": 70.1, "majority_answer": "yes", "num_annotated": 100,
               "num_examples": 100, "k_test": 128, "seconds": 12.5}
    card = create_model_card("org/xvlm-base-vqa", XVLMForQuestionAnswering(tiny_config), eval_results=metrics)
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-text-to-text"  # transformers 5 removed "visual-question-answering"
    assert "image-text-to-text" in data["tags"]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"vqa_accuracy", "exact_match"}  # no strings, no bookkeeping (counts, seconds)
    assert results["vqa_accuracy"].task_type == "visual-question-answering"
    assert results["vqa_accuracy"].metric_name == "VQA accuracy" and results["vqa_accuracy"].dataset_split == "minival"
    text = card.text
    assert TASKS["vqa"].summary in text and TASKS["vqa"].intended_use in text
    assert 'pipeline("xvlm-vqa", model="org/xvlm-base-vqa")' in text and "candidate_answers=" in text
    assert 'pipeline("image-text-to-text", model="org/xvlm-base-vqa")' in text and "return_full_text=False" in text
    assert "| Visual question answering | vqa_v2 | minival | VQA accuracy | 75.40 |" in text
    # Flat official-style results are recognised as VQA too.
    flat = create_model_card("org/x", XVLMForQuestionAnswering(tiny_config), eval_results={"vqa_accuracy": 70.0})
    assert flat.data.eval_results[0].task_type == "visual-question-answering"


def test_model_card_captioning(tiny_config) -> None:
    # as caption_metrics returns them (pycocoevalcap names)
    metrics = {"task": "captioning", "dataset": "coco_karpathy", "split": "test",
               "metrics": {"BLEU-4": 0.41, "METEOR": 0.31, "ROUGE-L": 0.6, "CIDEr": 1.4}}
    card = create_model_card("org/xvlm-coco-captioning", XVLMForConditionalGeneration(tiny_config),
                             eval_results=metrics)
    data = card.data.to_dict()
    # transformers 5 redirects "image-to-text" to this task
    assert data["pipeline_tag"] == "image-text-to-text" and "image-text-to-text" in data["tags"]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert results["CIDEr"].task_type == "image-to-text" and results["CIDEr"].task_name == "Image captioning"
    text = card.text
    assert TASKS["captioning"].summary in text and TASKS["captioning"].intended_use in text
    assert 'pipeline("image-text-to-text", model="org/xvlm-coco-captioning")' in text
    assert "return_full_text=False" in text and "caption_prompt(" in text and "post_process_captions(" in text
    # flat results without a task are recognised as captioning by their metric names
    flat = create_model_card("org/x", XVLMForConditionalGeneration(tiny_config), eval_results={"CIDEr": 1.2})
    assert flat.data.eval_results[0].task_type == "image-to-text"


def test_model_card_captioning_snippet_runs(tiny_tokenizer, rgb_image, tmp_path, monkeypatch) -> None:
    """The card's "How to use" code, run against a local tiny captioning folder."""
    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(tiny_tokenizer), "bos_token_id": 2,
                                                         "eos_token_id": 3})
    folder = tmp_path / "xvlm-tiny-captioning"
    model = XVLMForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor = tiny_processor(tiny_tokenizer, config)
    processor.save_pretrained(folder)
    text = create_model_card(str(folder), model).text
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    rgb_image.save(tmp_path / "kitchen.jpg")
    namespace = {"image": rgb_image}
    exec(compile(code, "model-card", "exec"), namespace)
    pixel_values = processor(images=[rgb_image])["pixel_values"]
    expected = model.generate(pixel_values, input_ids=processor.caption_prompt(1))
    assert torch.equal(namespace["generated"], expected)
    assert namespace["captions"] == processor.post_process_captions(expected)
    result = namespace["captioner"]("kitchen.jpg", text="a picture of ", return_full_text=False)
    assert result[0]["generated_text"] == namespace["captions"][0]


def test_load_eval_results_shapes(tmp_path) -> None:
    flat = load_eval_results({"txt_r1": 1, "r_mean": 2.5, "note": "x"})
    assert flat == [{"task": None, "dataset": None, "split": None, "metrics": {"txt_r1": 1.0, "r_mean": 2.5}}]
    nested = load_eval_results(
        {"results": [{"task": "grounding", "dataset_name": "refcoco+", "metrics": {"val": {"acc": 0.9}}}]}
    )
    assert nested[0]["dataset"] == "refcoco+" and nested[0]["metrics"] == {"val/acc": 0.9}
    with pytest.raises(ValueError, match="no numeric metric"):
        load_eval_results([{"task": "retrieval"}])
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"txt_r1": 3}]))
    assert load_eval_results(os.fspath(path))[0]["metrics"] == {"txt_r1": 3.0}


# ------------------------------------------------------------------------------- card pipeline tags, AutoModel


def _head_config(row, tiny_tokenizer):
    """A tiny config for the row's head: generation needs the [CLS] / [SEP] ids, NLVR2 heads their text stack."""
    from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config

    config = XVLMConfig.from_preset("tiny", text_config={"bos_token_id": tiny_tokenizer.cls_token_id,
                                                         "eos_token_id": tiny_tokenizer.sep_token_id})
    return nlvr2_config(config) if row.name.startswith("nlvr2") else config


def _saved_head(row, tiny_tokenizer, folder):
    config = _head_config(row, tiny_tokenizer)
    model = row.model_class(config).eval()
    model.save_pretrained(folder)
    processor = tiny_processor(tiny_tokenizer, config)
    processor.save_pretrained(folder)
    return model, processor


CARD_ROWS = [row for row in all_rows() if row.pipeline_tag is not None]


@pytest.mark.parametrize("row", CARD_ROWS, ids=lambda row: row.name)
def test_every_card_pipeline_tag_loads_and_runs(row, tiny_tokenizer, rgb_image, tmp_path) -> None:
    """`pipeline(card.pipeline_tag, model=folder)` works for the checkpoint of every head whose card has a tag, and
    answers what the model computes directly."""
    model, processor = _saved_head(row, tiny_tokenizer, tmp_path)
    tag = create_model_card("org/xvlm-tiny", model).data.pipeline_tag
    assert tag == row.pipeline_tag
    pipe = pipeline(tag, model=str(tmp_path))
    with torch.no_grad():
        if tag == "zero-shot-object-detection":  # one box per label: the processor's post-processing
            labels = ["the red circle", "a dog on the left"]
            result = pipe(rgb_image, candidate_labels=labels)
            inputs = processor(images=[rgb_image, rgb_image], text=labels)
            direct = processor.post_process_grounded_object_detection(
                model(**inputs), target_sizes=[(rgb_image.height, rgb_image.width)] * 2, text_labels=labels
            )
            assert [r["label"] for r in result] == labels and [r["score"] for r in result] == [1.0, 1.0]
            for r, d in zip(result, direct):
                assert list(r["box"].values()) == d["boxes"][0].int().tolist()
            assert pipe(rgb_image, candidate_labels=labels, threshold=1.0) == []
        elif tag == "feature-extraction":  # the base model's text-encoder states, and an image's sequence
            assert type(pipe.model) is XVLMModel
            inputs = processor(images=[rgb_image], text=["a red circle"])
            text = pipe("a red circle", return_tensors=True)
            expected = model.base_model.encode_text(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
            torch.testing.assert_close(text, expected)
            assert pipe("a red circle") == expected.tolist()
            image = pipe(rgb_image, return_tensors=True)
            torch.testing.assert_close(image, model.base_model.encode_image(inputs["pixel_values"]).last_hidden_state)
        elif tag == "zero-shot-image-classification":  # the ITC softmax over the labels
            result = pipe(rgb_image, candidate_labels=["red", "dog"])
            assert sorted(r["label"] for r in result) == ["dog", "red"]
            assert abs(sum(r["score"] for r in result) - 1.0) < 1e-5
        else:  # image-text-to-text: free-form VQA answers or captions
            text = "a picture of " if row.name == "captioning" else "what color is the circle?"
            result = pipe(rgb_image, text=text, return_full_text=False)
            assert result[0]["input_text"] == text and isinstance(result[0]["generated_text"], str)
            assert type(pipe.model) is row.model_class


def test_card_task_dispatch_leaves_other_models_to_transformers(tiny_tokenizer) -> None:
    """The card tasks' registered class builds transformers' own pipeline for a non-X-VLM model."""
    from transformers import BertConfig, BertModel
    from transformers.pipelines import PIPELINE_REGISTRY, FeatureExtractionPipeline

    from modeling_xvlm.pipelines import CARD_TASKS

    bert = BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)).eval()
    extractor = pipeline("feature-extraction", model=bert, tokenizer=tiny_tokenizer)
    assert type(extractor) is FeatureExtractionPipeline
    with torch.no_grad():
        expected = bert(**tiny_tokenizer("a red circle", return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(extractor("a red circle", return_tensors=True), expected)
    for task, (theirs, ours) in CARD_TASKS.items():
        entry = PIPELINE_REGISTRY.supported_tasks[task]
        assert entry["impl"].theirs is theirs and entry["impl"].ours is ours
        assert entry["default"] and entry["pt"]  # transformers' default model and Auto classes are kept
    register_xvlm()  # idempotent: the dispatcher is not wrapped twice
    assert PIPELINE_REGISTRY.supported_tasks["feature-extraction"]["impl"].theirs is FeatureExtractionPipeline


@pytest.mark.parametrize("row", list(TASKS.values()), ids=lambda row: row.name)
def test_automodel_is_the_base_model_of_every_head_checkpoint(row, tiny_tokenizer, tmp_path) -> None:
    """`AutoModel` gives `XVLMModel` with the head's base weights, the row's Auto class gives the head itself, and
    `auto_map` says the same for remote code (tests/test_remote_code.py loads them without the package)."""
    model, _ = _saved_head(row, tiny_tokenizer, tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is XVLMModel
    head_base, loaded = model.base_model.state_dict(), base.state_dict()
    common = head_base.keys() & loaded.keys()
    vision = {k for k in loaded if k.startswith("vision_model.")}
    assert vision and vision <= common  # every head keeps the image encoder under its base model
    assert all(torch.equal(loaded[k], head_base[k]) for k in common)
    head = getattr(transformers_module(), row.auto_class).from_pretrained(tmp_path)
    assert type(head) is row.model_class
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_xvlm.XVLMModel"
    module = row.model_class.__module__.rsplit(".", 1)[-1]
    assert auto_map[row.remote_auto_class] == f"{module}.{row.model_class.__name__}"
    assert row.remote_auto_class == row.auto_class or row.name == "captioning"


def transformers_module():
    import transformers

    return transformers
