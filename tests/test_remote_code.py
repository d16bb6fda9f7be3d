"""Remote code: saved folders load with `trust_remote_code=True` in a fresh interpreter without `modeling_xvlm`.

One subprocess checks every folder: `modeling_xvlm` is made unimportable there (a meta-path blocker, the repository
root removed from `sys.path`), so config, models, processor and pipelines can only come from the code files that
`save_pretrained` copied next to the weights (`transformers_modules.*`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline
from transformers.dynamic_module_utils import get_relative_import_files

from modeling_xvlm import (
    XVLMConfig,
    XVLMForConditionalGeneration,
    XVLMForGrounding,
    XVLMForImagesAndTextClassification,
    XVLMForPretraining,
    XVLMForQuestionAnswering,
    XVLMForRetrieval,
    XVLMForTextAssignment,
    XVLMModel,
)
from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config
from modeling_xvlm.hub import ships_flat
from modeling_xvlm.pipelines import XVLMZeroShotImageClassificationPipeline
from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor
from modeling_xvlm.tasks import task_of

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle on the left", "the blue square"]
LABELS = ["red", "blue", "dog"]
ANSWERS = ["red", "blue", "a dog", "the white cat"]
CAPTIONS = ["A red circle on the left.", "the blue square"]


pytestmark = pytest.mark.usefixtures("one_thread")

CHILD = r"""
import importlib.abc, importlib.util, json, os, sys

repo, root = sys.argv[1], sys.argv[2]


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_xvlm" or name.startswith("modeling_xvlm."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the remote-code test)")


sys.meta_path.insert(0, _Block())
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != repo]
try:
    import modeling_xvlm  # noqa: F401
    raise SystemExit("modeling_xvlm is importable: the test would not test remote code")
except ModuleNotFoundError:
    pass

import torch
from PIL import Image
from transformers import (AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForPreTraining,
                          AutoModelForSequenceClassification, AutoModelForZeroShotObjectDetection,
                          AutoModelForVisualQuestionAnswering, AutoModelForZeroShotImageClassification, AutoProcessor,
                          pipeline)

expected = torch.load(os.path.join(root, "expected.pt"))
meta = json.load(open(os.path.join(root, "meta.json")))
checks = []


def remote(obj):
    module = type(obj).__module__
    assert module.startswith("transformers_modules."), module
    return module


def same(name, a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    checks.append(name)


config = AutoConfig.from_pretrained(os.path.join(root, "base"), trust_remote_code=True)
remote(config)
assert type(config).__name__ == "XVLMConfig" and config.image_size == meta["image_size"]

if meta["processor_flat"]:
    processor = AutoProcessor.from_pretrained(os.path.join(root, "base"), trust_remote_code=True)
    remote(processor)
    remote(processor.image_processor)
    image = Image.open(os.path.join(root, "image.png"))
    inputs = dict(processor(images=[image, image], text=meta["texts"]))
    for key in ("pixel_values", "input_ids", "attention_mask"):
        same(f"processor.{key}", inputs[key], expected[key])
    inputs = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask")}
else:
    inputs = {k: expected[k] for k in ("pixel_values", "input_ids", "attention_mask")}

with torch.no_grad():
    base = AutoModel.from_pretrained(os.path.join(root, "base"), trust_remote_code=True).eval()
    assert type(base).__name__ == "XVLMModel", type(base)
    remote(base)
    same("XVLMModel.logits_per_image", base(**inputs).logits_per_image, expected["base"])

    retrieval = AutoModelForZeroShotImageClassification.from_pretrained(
        os.path.join(root, "retrieval"), trust_remote_code=True).eval()
    assert type(retrieval).__name__ == "XVLMForRetrieval", type(retrieval)
    remote(retrieval)
    out = retrieval(**inputs)
    same("XVLMForRetrieval.logits_per_image", out.logits_per_image, expected["retrieval_itc"])
    same("XVLMForRetrieval.itm_logits", out.itm_logits, expected["retrieval_itm"])

    grounding = AutoModelForZeroShotObjectDetection.from_pretrained(os.path.join(root, "grounding"),
                                                                    trust_remote_code=True).eval()
    assert type(grounding).__name__ == "XVLMForGrounding", type(grounding)
    remote(grounding)
    same("XVLMForGrounding.pred_boxes", grounding(**inputs).pred_boxes, expected["grounding"])

    pretraining = AutoModelForPreTraining.from_pretrained(os.path.join(root, "pretraining"), trust_remote_code=True)
    assert type(pretraining).__name__ == "XVLMForPretraining", type(pretraining)
    remote(pretraining)
    same("XVLMForPretraining.xvlm", pretraining.eval().xvlm(**inputs).logits_per_image, expected["pretraining"])

    # NLVR2 heads: (B, 2, 3, H, W) pairs; the TA head on fixed pairs
    pair_values = torch.stack([inputs["pixel_values"], inputs["pixel_values"].flip(0)], dim=1)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    nlvr2 = AutoModelForSequenceClassification.from_pretrained(os.path.join(root, "nlvr2"),
                                                               trust_remote_code=True).eval()
    assert type(nlvr2).__name__ == "XVLMForImagesAndTextClassification", type(nlvr2)
    remote(nlvr2)
    same("XVLMForImagesAndTextClassification.logits", nlvr2(pixel_values=pair_values, **text).logits,
         expected["nlvr2"])
    text_assignment = AutoModelForPreTraining.from_pretrained(os.path.join(root, "nlvr2_pretrain"),
                                                              trust_remote_code=True).eval()
    assert type(text_assignment).__name__ == "XVLMForTextAssignment", type(text_assignment)
    remote(text_assignment)
    same("XVLMForTextAssignment.logits", text_assignment(pixel_values=inputs["pixel_values"], **text,
         pair_index=torch.tensor([[0, 1], [1, 0]])).logits, expected["nlvr2_pretrain"])

    # AutoModel on a head's checkpoint: the base XVLMModel with the head's base weights, as without remote code
    for name, head in (("retrieval", retrieval), ("grounding", grounding), ("pretraining", pretraining),
                       ("nlvr2", nlvr2), ("nlvr2_pretrain", text_assignment)):
        auto = AutoModel.from_pretrained(os.path.join(root, name), trust_remote_code=True)
        assert type(auto).__name__ == "XVLMModel", (name, type(auto))
        remote(auto)
        head_state = head.xvlm.state_dict()
        auto_state = auto.state_dict()
        assert all(k in head_state for k in auto_state if k.startswith(("vision_model.", "text_model."))), name
        shared = sorted(auto_state.keys() & head_state.keys())
        same(f"AutoModel({name})", torch.cat([auto_state[k].flatten().float() for k in shared]),
             torch.cat([head_state[k].flatten().float() for k in shared]))

    # VQA head: forward with answers, the official ranking and generation
    vqa = AutoModelForVisualQuestionAnswering.from_pretrained(os.path.join(root, "vqa"), trust_remote_code=True).eval()
    assert type(vqa).__name__ == "XVLMForQuestionAnswering", type(vqa)
    remote(vqa)
    answer_ids, answer_mask = expected["vqa_answer_ids"], expected["vqa_answer_mask"]
    if meta["processor_flat"]:
        encoded = processor.encode_answers(meta["answers"])
        same("processor.encode_answers", encoded["input_ids"], answer_ids)
    out = vqa(**inputs, labels=answer_ids[:2])
    same("XVLMForQuestionAnswering.logits", out.logits, expected["vqa_logits"])
    same("XVLMForQuestionAnswering.loss", out.loss, expected["vqa_loss"])
    ranking = vqa.rank_answers(**inputs, answer_input_ids=answer_ids, answer_attention_mask=answer_mask, k=3)
    same("XVLMForQuestionAnswering.rank_answers.candidate_indices", ranking.candidate_indices,
         expected["vqa_candidate_indices"])
    same("XVLMForQuestionAnswering.rank_answers.scores", ranking.scores, expected["vqa_scores"])
    same("XVLMForQuestionAnswering.generate", vqa.generate(**inputs), expected["vqa_generated"])

    # captioning head: the loss with prompt-masked labels, the official beam search from the prompt
    captioner = AutoModelForImageTextToText.from_pretrained(os.path.join(root, "captioning"),
                                                            trust_remote_code=True).eval()
    assert type(captioner).__name__ == "XVLMForConditionalGeneration", type(captioner)
    remote(captioner)
    caption_ids, caption_mask, caption_labels = (expected[k] for k in ("caption_ids", "caption_mask", "caption_labels"))
    prompt_ids = expected["caption_prompt"]
    if meta["processor_flat"]:
        encoded = processor.encode_captions(meta["captions"])
        same("processor.encode_captions", encoded["labels"], caption_labels)
        same("processor.caption_prompt", processor.caption_prompt(2), prompt_ids)
    out = captioner(pixel_values=inputs["pixel_values"], input_ids=caption_ids, attention_mask=caption_mask,
                    labels=caption_labels)
    same("XVLMForConditionalGeneration.logits", out.logits, expected["caption_logits"])
    same("XVLMForConditionalGeneration.loss", out.loss, expected["caption_loss"])
    generated = captioner.generate(inputs["pixel_values"], input_ids=prompt_ids)
    same("XVLMForConditionalGeneration.generate", generated, expected["caption_generated"])
    if meta["processor_flat"]:
        assert processor.post_process_captions(generated) == meta["captions_generated"]
        checks.append("processor.post_process_captions")

image = Image.open(os.path.join(root, "image.png"))
zero_shot = pipeline("zero-shot-image-classification", model=os.path.join(root, "zero_shot_pipeline"),
                     trust_remote_code=True)
remote(zero_shot)
result = zero_shot(image, candidate_labels=meta["labels"])
scores = {r["label"]: r["score"] for r in result}
expected_scores = {r["label"]: r["score"] for r in meta["zero_shot"]}
assert scores.keys() == expected_scores.keys(), result
same("pipeline.zero-shot", torch.tensor([scores[k] for k in meta["labels"]]),
     torch.tensor([expected_scores[k] for k in meta["labels"]]))

grounder = pipeline("visual-grounding", model=os.path.join(root, "grounding_pipeline"), trust_remote_code=True)
remote(grounder)
assert type(grounder.model).__name__ == "XVLMForGrounding"
result = grounder(image, meta["texts"][0])
same("pipeline.visual-grounding", torch.tensor(result["box_xyxy"]), torch.tensor(meta["grounding_box"]))
assert result["preview"].size == image.size

if meta["processor_flat"]:  # the pipeline ranks through the processor's encode_answers / post_process_answers
    vqa_pipe = pipeline("xvlm-vqa", model=os.path.join(root, "vqa_pipeline"), trust_remote_code=True)
    remote(vqa_pipe)
    assert type(vqa_pipe.model).__name__ == "XVLMForQuestionAnswering"
    result = vqa_pipe(image, meta["texts"][0], candidate_answers=meta["answers"], top_k=3)
    assert [r["answer"] for r in result] == [r["answer"] for r in meta["vqa_pipeline"]], result
    same("pipeline.xvlm-vqa", torch.tensor([r["score"] for r in result]),
         torch.tensor([r["score"] for r in meta["vqa_pipeline"]]))
if meta["processor_flat"]:  # transformers' image-text-to-text pipeline on the remote captioner and processor
    captioner_pipe = pipeline("image-text-to-text", model=os.path.join(root, "captioning"), trust_remote_code=True)
    remote(captioner_pipe.model)
    remote(captioner_pipe.processor)
    result = captioner_pipe(image, text="a picture of ", return_full_text=False)
    assert result == [{"input_text": "a picture of ", "generated_text": meta["captions_generated"][0]}], result
    checks.append("pipeline.image-text-to-text.captioning")
print(json.dumps({"checks": checks}))
"""


@pytest.fixture(scope="module")
def remote_folders(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("remote")
    tokenizer = tiny_tokenizer
    config = XVLMConfig.from_preset("tiny")
    vqa_config = XVLMConfig.from_preset("tiny")  # generate needs the [CLS] / [SEP] ids
    vqa_config.text_config.bos_token_id = tokenizer.cls_token_id
    vqa_config.text_config.eos_token_id = tokenizer.sep_token_id
    caption_config = XVLMConfig.from_preset(  # spread-out logits: captions that depend on the image
        "tiny", initializer_range=0.2,
        text_config={"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
                     "initializer_range": 0.2},
    )
    size = config.image_size
    processor = XVLMProcessor(
        XVLMImageProcessorPil(size={"height": size, "width": size}, patch_size=config.patch_stride), tokenizer
    )
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8), mode="RGB")
    image.save(root / "image.png")
    image = Image.open(root / "image.png")
    inputs = dict(processor(images=[image, image], text=TEXTS))
    inputs = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    expected = dict(inputs)

    models = {
        "base": XVLMModel(config),
        "retrieval": XVLMForRetrieval(config),
        "grounding": XVLMForGrounding(config),
        "pretraining": XVLMForPretraining(config),
        "nlvr2": XVLMForImagesAndTextClassification(nlvr2_config(config)),
        "nlvr2_pretrain": XVLMForTextAssignment(nlvr2_config(config)),
        "vqa": XVLMForQuestionAnswering(vqa_config),
        "captioning": XVLMForConditionalGeneration(caption_config),
    }
    with torch.no_grad():
        for name, model in models.items():
            model.eval().save_pretrained(root / name)
            processor.save_pretrained(root / name)
        expected["base"] = models["base"](**inputs).logits_per_image
        out = models["retrieval"](**inputs)
        expected["retrieval_itc"], expected["retrieval_itm"] = out.logits_per_image, out.itm_logits
        expected["grounding"] = models["grounding"](**inputs).pred_boxes
        expected["pretraining"] = models["pretraining"].xvlm(**inputs).logits_per_image
        pair_values = torch.stack([inputs["pixel_values"], inputs["pixel_values"].flip(0)], dim=1)
        text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        expected["nlvr2"] = models["nlvr2"](pixel_values=pair_values, **text).logits
        expected["nlvr2_pretrain"] = models["nlvr2_pretrain"](
            pixel_values=inputs["pixel_values"], **text, pair_index=torch.tensor([[0, 1], [1, 0]])
        ).logits
        answers = processor.encode_answers(ANSWERS)
        expected["vqa_answer_ids"], expected["vqa_answer_mask"] = answers["input_ids"], answers["attention_mask"]
        out = models["vqa"](**inputs, labels=answers["input_ids"][:2])
        expected["vqa_logits"], expected["vqa_loss"] = out.logits, out.loss
        ranking = models["vqa"].rank_answers(
            **inputs, answer_input_ids=answers["input_ids"], answer_attention_mask=answers["attention_mask"], k=3
        )
        expected["vqa_candidate_indices"], expected["vqa_scores"] = ranking.candidate_indices, ranking.scores
        expected["vqa_generated"] = models["vqa"].generate(**inputs)
        captions = processor.encode_captions(CAPTIONS)
        expected["caption_ids"], expected["caption_mask"] = captions["input_ids"], captions["attention_mask"]
        expected["caption_labels"] = captions["labels"]
        out = models["captioning"](pixel_values=inputs["pixel_values"], **captions)
        expected["caption_logits"], expected["caption_loss"] = out.logits, out.loss
        expected["caption_prompt"] = processor.caption_prompt(2)
        expected["caption_generated"] = models["captioning"].generate(
            inputs["pixel_values"], input_ids=expected["caption_prompt"]
        )
    torch.save(expected, root / "expected.pt")

    zero_shot = pipeline(
        "zero-shot-image-classification", model=models["retrieval"], processor=processor,
        pipeline_class=XVLMZeroShotImageClassificationPipeline,
    )
    zero_shot.save_pretrained(root / "zero_shot_pipeline")
    grounder = pipeline("visual-grounding", model=models["grounding"], processor=processor)
    grounder.save_pretrained(root / "grounding_pipeline")
    vqa_pipe = pipeline("xvlm-vqa", model=models["vqa"], processor=processor)
    vqa_pipe.save_pretrained(root / "vqa_pipeline")
    meta = {
        "image_size": size,
        "texts": TEXTS,
        "labels": LABELS,
        "processor_flat": ships_flat(XVLMProcessor) and ships_flat(XVLMImageProcessorPil),
        "zero_shot": zero_shot(image, candidate_labels=LABELS),
        "grounding_box": grounder(image, TEXTS[0], preview=False)["box_xyxy"],
        "answers": ANSWERS,
        "vqa_pipeline": vqa_pipe(image, TEXTS[0], candidate_answers=ANSWERS, top_k=3),
        "captions": CAPTIONS,
        "captions_generated": processor.post_process_captions(expected["caption_generated"]),
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root, meta


def test_pipeline_folders_record_custom_pipelines(remote_folders) -> None:
    root, _ = remote_folders
    zero_shot = json.loads((root / "zero_shot_pipeline" / "config.json").read_text())["custom_pipelines"]
    assert zero_shot["zero-shot-image-classification"]["impl"] == "pipelines.XVLMZeroShotImageClassificationPipeline"
    assert zero_shot["zero-shot-image-classification"]["pt"] == ["AutoModelForZeroShotImageClassification"]
    grounding = json.loads((root / "grounding_pipeline" / "config.json").read_text())["custom_pipelines"]
    assert grounding["visual-grounding"] == {
        "impl": "pipelines.XVLMVisualGroundingPipeline",
        "pt": ["AutoModelForZeroShotObjectDetection"],
        "type": "multimodal",
    }
    assert (root / "grounding_pipeline" / "pipelines.py").is_file()
    vqa = json.loads((root / "vqa_pipeline" / "config.json").read_text())["custom_pipelines"]
    assert vqa["xvlm-vqa"] == {
        "impl": "pipelines.XVLMVisualQuestionAnsweringPipeline",
        "pt": ["AutoModelForVisualQuestionAnswering"],
        "type": "multimodal",
    }
    assert {"pipelines.py", "modeling_xvlm_vqa.py", "processing_xvlm.py"} <= set(os.listdir(root / "vqa_pipeline"))


FOLDER_CLASSES = {
    "base": XVLMModel,
    "retrieval": XVLMForRetrieval,
    "grounding": XVLMForGrounding,
    "pretraining": XVLMForPretraining,
    "nlvr2": XVLMForImagesAndTextClassification,
    "nlvr2_pretrain": XVLMForTextAssignment,
    "vqa": XVLMForQuestionAnswering,
    "captioning": XVLMForConditionalGeneration,
}


@pytest.mark.parametrize("folder", sorted(FOLDER_CLASSES))
def test_every_head_folder_carries_its_module_and_siblings_flat(remote_folders, folder) -> None:
    """Each head lives in its own module; `auto_map` names it and every sibling it imports is copied flat."""
    root, _ = remote_folders
    cls = FOLDER_CLASSES[folder]
    module_file = Path(sys.modules[cls.__module__].__file__)
    auto_map = json.loads((root / folder / "config.json").read_text())["auto_map"]
    assert auto_map[task_of(cls).remote_auto_class] == f"{module_file.stem}.{cls.__name__}"
    needed = {module_file.name, "configuration_xvlm.py"}
    needed |= {Path(f).name for f in get_relative_import_files(str(module_file))}
    assert needed <= set(os.listdir(root / folder)), needed - set(os.listdir(root / folder))
    if folder == "captioning":  # the head and its decoding (official 4.12.5 beam search) ship together
        assert {"modeling_xvlm_captioning.py", "official_generation.py", "modeling_xvlm_text.py"} <= needed


def test_fresh_interpreter_loads_everything_as_remote_code(remote_folders, tmp_path) -> None:
    root, meta = remote_folders
    assert all(meta["captions_generated"])  # the tiny captioner says something: the comparisons are not vacuous
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(script), str(REPO_ROOT), str(root)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    checks = json.loads(result.stdout.strip().splitlines()[-1])["checks"]
    expected_checks = {
        "XVLMModel.logits_per_image",
        "XVLMForRetrieval.logits_per_image",
        "XVLMForRetrieval.itm_logits",
        "XVLMForGrounding.pred_boxes",
        "XVLMForPretraining.xvlm",
        *(f"AutoModel({name})" for name in ("retrieval", "grounding", "pretraining", "nlvr2", "nlvr2_pretrain")),
        "XVLMForImagesAndTextClassification.logits",
        "XVLMForTextAssignment.logits",
        "XVLMForQuestionAnswering.logits",
        "XVLMForQuestionAnswering.loss",
        "XVLMForQuestionAnswering.rank_answers.candidate_indices",
        "XVLMForQuestionAnswering.rank_answers.scores",
        "XVLMForQuestionAnswering.generate",
        "XVLMForConditionalGeneration.logits",
        "XVLMForConditionalGeneration.loss",
        "XVLMForConditionalGeneration.generate",
        "pipeline.zero-shot",
        "pipeline.visual-grounding",
    }
    if meta["processor_flat"]:
        expected_checks |= {"processor.pixel_values", "processor.input_ids", "processor.attention_mask",
                            "processor.encode_answers", "pipeline.xvlm-vqa", "processor.encode_captions",
                            "processor.caption_prompt", "processor.post_process_captions",
                            "pipeline.image-text-to-text.captioning"}
    assert set(checks) == expected_checks


def test_processor_ships_as_remote_code() -> None:
    """The processor and image processor modules import only sibling modules, so they can be copied flat."""
    assert ships_flat(XVLMProcessor) and ships_flat(XVLMImageProcessorPil)
    assert XVLMProcessor._auto_class == "AutoProcessor"
    assert XVLMImageProcessorPil._auto_class == "AutoImageProcessor"


def test_shipped_model_modules_import_only_siblings() -> None:
    for cls in (
        XVLMConfig, XVLMModel, XVLMForRetrieval, XVLMForGrounding, XVLMForPretraining,
        XVLMForImagesAndTextClassification, XVLMForTextAssignment, XVLMForQuestionAnswering,
        XVLMForConditionalGeneration,
    ):
        assert ships_flat(cls), cls


def test_processing_box_convert_equals_box_ops() -> None:
    """The processing modules carry their own `box_convert` (to ship flat); it must stay identical to box_ops'."""
    import itertools

    from modeling_xvlm import box_ops
    from modeling_xvlm.processing import boxes

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        data = torch.rand(5, 3, 4, generator=generator, dtype=dtype) * 100
        for in_fmt, out_fmt in itertools.product(box_ops.BOX_FORMATS, repeat=2):
            assert torch.equal(boxes.box_convert(data, in_fmt, out_fmt), box_ops.box_convert(data, in_fmt, out_fmt))
    assert tuple(boxes.BOX_FORMATS) == tuple(box_ops.BOX_FORMATS)
    with pytest.raises(ValueError, match="in_fmt"):
        boxes.box_convert(data, "xy", "xyxy")
    with pytest.raises(ValueError, match="last dimension"):
        boxes.box_convert(data[..., :3], "xyxy", "xywh")
