"""The X-VLM pipelines on tiny models (zero-shot, retrieval, grounding, VQA ranking) and transformers'
`image-text-to-text` pipeline on the VQA and the captioning head: outputs against the model, batching, loading
from a folder, the opt-in default caption prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, pipeline
from transformers import AutoModelForImageTextToText, AutoModelForVisualQuestionAnswering
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline
from transformers.pipelines.zero_shot_image_classification import ZeroShotImageClassificationPipeline

from modeling_xvlm import (
    XVLMConfig,
    XVLMForConditionalGeneration,
    XVLMForGrounding,
    XVLMForQuestionAnswering,
    XVLMForRetrieval,
    XVLMModel,
)
from modeling_xvlm.pipelines import (
    XVLMImageTextRetrievalPipeline,
    XVLMImageTextToTextPipeline,
    XVLMVisualGroundingPipeline,
    XVLMVisualQuestionAnsweringPipeline,
    XVLMZeroShotImageClassificationPipeline,
)
from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

LABELS = ["red", "blue circle", "dog", "a white cat"]


pytestmark = pytest.mark.usefixtures("one_thread")


def by_key(results: list[dict], key: str = "label") -> dict:
    """`{label: score}` (or `{index: score}`): compares results without depending on the order of near-ties."""
    return {r[key]: pytest.approx(r["score"], abs=1e-5) for r in results}


@pytest.fixture(scope="module")
def config() -> XVLMConfig:
    return XVLMConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def processor(tiny_tokenizer, config) -> XVLMProcessor:
    size = config.image_size
    image_processor = XVLMImageProcessorPil(size={"height": size, "width": size}, patch_size=config.patch_stride)
    return XVLMProcessor(image_processor, tiny_tokenizer)


@pytest.fixture(scope="module")
def retrieval_model(config) -> XVLMForRetrieval:
    torch.manual_seed(0)
    model = XVLMForRetrieval(config).eval()
    # Make the tiny random model's scores less flat so that rankings are meaningful.
    with torch.no_grad():
        model.xvlm.temp.fill_(0.01)
    return model


@pytest.fixture(scope="module")
def grounding_model(config) -> XVLMForGrounding:
    torch.manual_seed(1)
    return XVLMForGrounding(config).eval()


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, size=(40 + 8 * i, 56 + 4 * i, 3), dtype=np.uint8), mode="RGB")
        for i in range(3)
    ]


def zero_shot(**kwargs):
    """The X-VLM zero-shot pipeline chosen explicitly (`pipeline_class=`), for any model."""
    return pipeline("zero-shot-image-classification", pipeline_class=XVLMZeroShotImageClassificationPipeline, **kwargs)


def test_tasks_are_registered() -> None:
    import logging

    tasks = PIPELINE_REGISTRY.supported_tasks
    # a card task dispatches: X-VLM models get the X-VLM class, others transformers' own (test_hub.py); no logger
    # is silenced
    assert tasks["zero-shot-image-classification"]["impl"].theirs is ZeroShotImageClassificationPipeline
    assert tasks["zero-shot-image-classification"]["impl"].ours is XVLMZeroShotImageClassificationPipeline
    assert tasks["zero-shot-image-classification"]["default"]
    assert logging.getLogger("transformers.pipelines.base").level == logging.NOTSET
    assert tasks["image-text-retrieval"]["impl"] is XVLMImageTextRetrievalPipeline
    assert tasks["visual-grounding"]["impl"] is XVLMVisualGroundingPipeline
    assert tasks["visual-grounding"]["pt"] == (XVLMForGrounding,)
    assert tasks["xvlm-vqa"]["impl"] is XVLMVisualQuestionAnsweringPipeline
    assert tasks["xvlm-vqa"]["pt"] == (AutoModelForVisualQuestionAnswering,)
    # Free-form VQA runs on transformers' own image-text-to-text pipeline, which stays theirs.
    theirs = ImageTextToTextPipeline
    assert tasks["image-text-to-text"]["impl"] in (theirs, f"{theirs.__module__}.{theirs.__qualname__}")


# ------------------------------------------------------------------------------------------ zero-shot


def test_zero_shot_scores_are_the_itc_softmax(retrieval_model, processor, images) -> None:
    classifier = zero_shot(model=retrieval_model, processor=processor)
    assert isinstance(classifier, XVLMZeroShotImageClassificationPipeline)
    result = classifier(images[0], candidate_labels=LABELS, hypothesis_template="a photo of {}")
    inputs = processor(images=images[0], text=[f"a photo of {label}" for label in LABELS])
    assert not (inputs["input_ids"] == processor.tokenizer.sep_token_id).any()  # X-VLM: no [SEP]
    with torch.no_grad():
        logits = retrieval_model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]).logits_per_image
    probs = logits[0].softmax(-1)
    expected = sorted(zip(probs.tolist(), LABELS), key=lambda x: -x[0])
    assert [r["label"] for r in result] == [label for _, label in expected]
    assert [r["score"] for r in result] == pytest.approx([p for p, _ in expected], abs=1e-5)
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)


def test_zero_shot_batching_matches_single_calls(retrieval_model, processor, images) -> None:
    classifier = zero_shot(model=retrieval_model, processor=processor)
    singles = [classifier(image, candidate_labels=LABELS) for image in images]
    batched = classifier(images, candidate_labels=LABELS, batch_size=2)
    assert len(batched) == len(images)
    for single, batch in zip(singles, batched):
        assert {r["label"]: r["score"] for r in batch} == by_key(single)


def test_zero_shot_itm_rerank(retrieval_model, processor, images) -> None:
    classifier = zero_shot(model=retrieval_model, processor=processor)
    plain = classifier(images[1], candidate_labels=LABELS)
    result = classifier(images[1], candidate_labels=LABELS, rerank=True, rerank_top_k=3)
    reranked, rest = result[:3], result[3:]
    assert {r["label"] for r in reranked} == {r["label"] for r in plain[:3]}  # ITC picks the candidates
    assert [r["label"] for r in rest] == [plain[3]["label"]] and rest[0]["score"] == 0.0
    texts = [f"This is a photo of {r['label']}." for r in reranked]
    inputs = processor(images=[images[1]] * 3, text=texts)
    with torch.no_grad():
        itm = retrieval_model.itm_scores(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    assert [r["itm_score"] for r in reranked] == pytest.approx(itm.tolist(), abs=1e-5)
    assert itm.tolist() == sorted(itm.tolist(), reverse=True)  # ranked by the raw ITM logit
    assert sum(r["score"] for r in reranked) == pytest.approx(1.0, abs=1e-5)
    batched = classifier(images, candidate_labels=LABELS, rerank=True, rerank_top_k=3, batch_size=3)
    assert {r["label"]: r["score"] for r in batched[1]} == by_key(result)


def test_zero_shot_base_model_and_rerank_error(config, processor, images) -> None:
    classifier = zero_shot(model=XVLMModel(config).eval(), processor=processor)
    assert len(classifier(images[0], candidate_labels=LABELS)) == len(LABELS)
    with pytest.raises(ValueError, match="ITM head"):
        classifier(images[0], candidate_labels=LABELS, rerank=True)


def test_zero_shot_leaves_other_models_to_transformers(tiny_tokenizer, images, tmp_path) -> None:
    from transformers import CLIPImageProcessorPil

    clip_config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=8,
    )
    clip = CLIPModel(clip_config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ours = zero_shot(model=clip, tokenizer=tiny_tokenizer, image_processor=image_processor)
    assert isinstance(ours, XVLMZeroShotImageClassificationPipeline)
    theirs = pipeline("zero-shot-image-classification", model=clip, tokenizer=tiny_tokenizer,
                      image_processor=image_processor)
    assert type(theirs) is ZeroShotImageClassificationPipeline  # the task is still transformers'
    assert ours(images[0], candidate_labels=LABELS) == theirs(images[0], candidate_labels=LABELS)
    ours.save_pretrained(tmp_path)
    assert "custom_pipelines" not in json.loads((tmp_path / "config.json").read_text())
    assert not (tmp_path / "pipelines.py").exists()


def test_zero_shot_from_a_saved_folder(retrieval_model, processor, images, tmp_path) -> None:
    retrieval_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    classifier = zero_shot(model=str(tmp_path))
    assert type(classifier.model) is XVLMForRetrieval
    assert type(classifier.processor) is XVLMProcessor
    direct = zero_shot(model=retrieval_model, processor=processor)
    loaded, expected = classifier(images[0], candidate_labels=LABELS), direct(images[0], candidate_labels=LABELS)
    assert {r["label"]: r["score"] for r in loaded} == by_key(expected)


def test_saved_zero_shot_pipeline_records_its_class(retrieval_model, processor, tmp_path) -> None:
    """Without overwriting the task, a saved X-VLM zero-shot pipeline still names its class (custom_pipelines)."""
    zero_shot(model=retrieval_model, processor=processor).save_pretrained(tmp_path)
    custom = json.loads((tmp_path / "config.json").read_text())["custom_pipelines"]
    entry = custom["zero-shot-image-classification"]
    assert entry["impl"] == "pipelines.XVLMZeroShotImageClassificationPipeline"
    assert entry["pt"] == ["AutoModelForZeroShotImageClassification"]
    assert (tmp_path / "pipelines.py").is_file() and (tmp_path / "retrieval.py").is_file()
    retrieval_model.config.custom_pipelines = {}  # the module-scoped model is shared with the other tests


# ------------------------------------------------------------------------------------------ retrieval


def test_text_to_image_retrieval(retrieval_model, processor, images) -> None:
    retriever = pipeline("image-text-retrieval", model=retrieval_model, processor=processor)
    query = "a red circle"
    result = retriever(query, images=images, top_k=2, k_test=3)
    assert len(result) == 2 and all(r["image"] is images[r["index"]] for r in result)
    inputs = processor(images=images, text=[query] * len(images))
    with torch.no_grad():
        image_feat = retrieval_model.xvlm.get_image_features(inputs["pixel_values"]).pooler_output
        text_feat = retrieval_model.xvlm.get_text_features(inputs["input_ids"][:1], inputs["attention_mask"][:1])
        itm = retrieval_model.itm_scores(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    cosine = (text_feat.pooler_output @ image_feat.t())[0]
    order = itm.argsort(descending=True)[:2].tolist()
    assert [r["index"] for r in result] == order
    assert [r["score"] for r in result] == pytest.approx(itm[order].tolist(), abs=1e-5)
    assert [r["itc_score"] for r in result] == pytest.approx(cosine[order].tolist(), abs=1e-5)
    # Without re-ranking: ITC cosine similarity order.
    plain = retriever(query, images=images, top_k=3, rerank=False)
    assert [r["index"] for r in plain] == cosine.argsort(descending=True).tolist()
    assert [r["score"] for r in plain] == pytest.approx(sorted(cosine.tolist(), reverse=True), abs=1e-5)


def test_image_to_text_retrieval_and_batching(retrieval_model, processor, images) -> None:
    texts = ["a red circle", "the blue square", "a dog on the left", "a cat"]
    retriever = pipeline("image-text-retrieval", model=retrieval_model, processor=processor)
    singles = [retriever(image, texts=texts, top_k=3) for image in images]
    batched = retriever(images, texts=texts, top_k=3, batch_size=2, gallery_batch_size=3)
    for single, batch in zip(singles, batched):
        assert {r["index"]: r["score"] for r in batch} == by_key(single, "index")
        assert all(r["text"] == texts[r["index"]] for r in single)
    inputs = processor(images=images[0], text=texts)
    with torch.no_grad():
        itm = retrieval_model.itm_scores(
            inputs["pixel_values"].expand(len(texts), -1, -1, -1), inputs["input_ids"], inputs["attention_mask"]
        )
    assert [r["index"] for r in singles[0]] == itm.argsort(descending=True)[:3].tolist()
    query_batches = retriever(["a red circle", "a cat", "the blue square"], images=images, batch_size=2)
    assert [q[0]["index"] for q in query_batches] == [
        retriever(q, images=images)[0]["index"] for q in ["a red circle", "a cat", "the blue square"]
    ]


def test_retrieval_argument_errors(retrieval_model, processor, images) -> None:
    retriever = pipeline("image-text-retrieval", model=retrieval_model, processor=processor)
    with pytest.raises(ValueError, match="exactly one gallery"):
        retriever("a cat", images=images, texts=["a"])
    with pytest.raises(ValueError, match="exactly one gallery"):
        retriever("a cat")
    with pytest.raises(ValueError, match="must be texts"):
        retriever(images[0], images=images)


# ------------------------------------------------------------------------------------------ grounding


def test_grounding_box_in_pixels_and_preview(grounding_model, processor, images) -> None:
    grounder = pipeline("visual-grounding", model=grounding_model, processor=processor)
    image = images[2]
    result = grounder(image, "the dog on the left")
    inputs = processor(images=image, text="the dog on the left")
    with torch.no_grad():
        cx, cy, w, h = grounding_model(**inputs).pred_boxes[0].tolist()
    width, height = image.size
    expected = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    assert result["box_xyxy"] == pytest.approx(expected, abs=1e-4)
    assert result["box_cxcywh_normalized"] == pytest.approx([cx, cy, w, h], abs=1e-6)
    assert result["box"] == dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(v) for v in expected)))
    post = processor.post_process_grounding(torch.tensor([[cx, cy, w, h]]), target_sizes=[(height, width)])
    assert result["box_xyxy"] == pytest.approx(post[0]["boxes"][0].tolist(), abs=1e-4)
    preview = result["preview"]
    assert preview.size == image.size and preview is not image
    x0 = int(result["box_xyxy"][0])
    row = (result["box"]["ymin"] + result["box"]["ymax"]) // 2
    assert (255, 0, 0) in [preview.getpixel((x, row)) for x in range(max(0, x0 - 1), x0 + 3)]  # left edge drawn
    assert "preview" not in grounder(image, "the dog", preview=False)


def test_grounding_batching_and_input_forms(grounding_model, processor, images) -> None:
    grounder = pipeline("visual-grounding", model=grounding_model, processor=processor)
    texts = ["the dog on the left", "a cat", "the big red square at the top"]
    singles = [grounder(image, text) for image, text in zip(images, texts)]
    batched = grounder(images, texts, batch_size=2)
    as_dicts = grounder([{"image": i, "text": t} for i, t in zip(images, texts)], batch_size=3)
    for single, a, b in zip(singles, batched, as_dicts):
        assert single["text"] == a["text"] == b["text"]
        assert single["box_xyxy"] == pytest.approx(a["box_xyxy"], abs=1e-4)
        assert single["box_xyxy"] == pytest.approx(b["box_xyxy"], abs=1e-4)
    several = grounder(images[0], texts[:2])
    assert [r["text"] for r in several] == texts[:2]
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        grounder(images, texts[:2])


def test_grounding_from_a_saved_folder(grounding_model, processor, images, tmp_path) -> None:
    grounding_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    grounder = pipeline("visual-grounding", model=str(tmp_path))
    assert type(grounder.model) is XVLMForGrounding
    direct = pipeline("visual-grounding", model=grounding_model, processor=processor)
    assert grounder(images[0], "a dog")["box"] == direct(images[0], "a dog")["box"]


# ------------------------------------------------------------------------------------------ VQA

ANSWERS = ["red", "blue", "a dog", "the white cat", "left", "two", "big"]
QUESTIONS = ["What color is the dog?", "Is the cat on the left?", "How big is the red square?"]


@pytest.fixture(scope="module")
def vqa_processor(tiny_tokenizer, config) -> XVLMProcessor:
    """A VQA processor: questions cleaned with the official pre_question (50 words, as the official test)."""
    size = config.image_size
    image_processor = XVLMImageProcessorPil(size={"height": size, "width": size}, patch_size=config.patch_stride)
    return XVLMProcessor(image_processor, tiny_tokenizer, text_preprocessing="question", max_words=50)


@pytest.fixture(scope="module")
def vqa_model(tiny_tokenizer) -> XVLMForQuestionAnswering:
    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(tiny_tokenizer)})
    config.text_config.bos_token_id = tiny_tokenizer.cls_token_id  # generate starts at [CLS], stops at [SEP]
    config.text_config.eos_token_id = tiny_tokenizer.sep_token_id
    torch.manual_seed(2)
    return XVLMForQuestionAnswering(config).eval()


@pytest.fixture(scope="module")
def vqa_folder(vqa_model, vqa_processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa")
    vqa_model.save_pretrained(folder)
    vqa_processor.save_pretrained(folder)
    return folder


def direct_ranking(model, processor, images, questions, answers, top_k=1, **kwargs) -> list[list[dict]]:
    """`post_process_answers(model.rank_answers(...))` computed without the pipeline."""
    inputs = processor(images=images, text=questions)
    candidates = processor.encode_answers(answers)
    ranking = model.rank_answers(
        inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
        candidates["input_ids"], candidates["attention_mask"], **kwargs,
    )
    return processor.post_process_answers(ranking, answers, top_k=top_k)


def same_answers(got: list[dict], expected: list[dict]) -> None:
    assert [r["answer"] for r in got] == [r["answer"] for r in expected]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_image_text_to_text_generates_answers(vqa_model, vqa_processor, vqa_folder, images) -> None:
    """transformers' own pipeline, loaded from a saved VQA folder, answers by `XVLMForQuestionAnswering.generate`."""
    generator = pipeline("image-text-to-text", model=str(vqa_folder))
    assert type(generator) is ImageTextToTextPipeline
    assert type(generator.model) is XVLMForQuestionAnswering and type(generator.processor) is XVLMProcessor
    assert generator.model.generation_config.max_new_tokens == 10
    question = QUESTIONS[0]
    result = generator(images[0], text=question, return_full_text=False)
    inputs = vqa_processor(images=images[0], text=question)
    assert inputs["input_ids"][0].tolist() == vqa_processor(text="what color is the dog")["input_ids"][0].tolist()
    expected = vqa_model.generate(**inputs)  # greedy, at most 10 new tokens by default
    assert expected[0, 0] == vqa_processor.tokenizer.cls_token_id and expected.shape[1] <= 1 + 10
    answer = vqa_processor.batch_decode(expected, skip_special_tokens=True)[0]
    assert answer  # the tiny model does say something
    assert result == [{"input_text": question, "generated_text": answer}]
    # transformers' default (`return_full_text=True`) puts the prompt before the generated text.
    assert generator(images[0], text=question) == [{"input_text": question, "generated_text": question + answer}]
    # Several (image, question) pairs: padded questions, one answer each, as a batched generate.
    batch = generator(images[:2], text=QUESTIONS[:2], return_full_text=False)
    inputs = vqa_processor(images=images[:2], text=QUESTIONS[:2])
    answers = vqa_processor.batch_decode(vqa_model.generate(**inputs), skip_special_tokens=True)
    assert batch == [{"input_text": q, "generated_text": a} for q, a in zip(QUESTIONS[:2], answers)]


def test_image_text_to_text_batches_left_padded_questions_like_single_calls(
    vqa_model, vqa_processor, images, monkeypatch
) -> None:
    """transformers' pipeline collates a stream of questions padded on the left (5.25 switches the tokenizer to it):
    the model reads them right-padded, as the processor pads them, and answers as for one question at a time."""
    generator = pipeline("image-text-to-text", model=vqa_model, processor=vqa_processor)
    questions = [QUESTIONS[0], QUESTIONS[2]]
    seen = []
    encode = vqa_model.encode_questions
    monkeypatch.setattr(vqa_model, "encode_questions", lambda *a, **k: seen.append(a[1:3]) or encode(*a, **k))
    monkeypatch.setattr(generator.tokenizer, "padding_side", "left")
    singles = [generator(images[i], text=q, return_full_text=False)[0] for i, q in enumerate(questions)]
    pairs = ({"images": image, "text": q} for image, q in zip(images, questions))  # collated by the pipeline
    batch = [out[0] for out in generator(pairs, return_full_text=False, batch_size=2)]
    monkeypatch.setattr(generator.tokenizer, "padding_side", "right")
    expected = vqa_processor(text=questions)
    assert expected["attention_mask"][:, 0].all() and not expected["attention_mask"].all()
    assert torch.equal(seen[-1][0], expected["input_ids"]) and torch.equal(seen[-1][1], expected["attention_mask"])
    assert batch == singles


def test_image_text_to_text_generation_arguments(vqa_model, vqa_processor, images) -> None:
    generator = pipeline("image-text-to-text", model=vqa_model, processor=vqa_processor)
    question = QUESTIONS[1]
    inputs = vqa_processor(images=images[1], text=question)
    for kwargs in ({"max_new_tokens": 2}, {"max_new_tokens": 4, "num_beams": 2}):
        result = generator(images[1], text=question, return_full_text=False, generate_kwargs=kwargs)
        expected = vqa_model.generate(**inputs, **kwargs)
        assert expected.shape[1] <= 1 + kwargs["max_new_tokens"]
        assert result[0]["generated_text"] == vqa_processor.batch_decode(expected, skip_special_tokens=True)[0]
    tokens = generator(images[1], text=question, return_tensors=True, max_new_tokens=3)[0]["generated_token_ids"]
    assert tokens.tolist() == vqa_model.generate(**inputs, max_new_tokens=3)[0].tolist()


def test_vqa_ranking_matches_rank_answers(vqa_model, vqa_processor, images) -> None:
    vqa = pipeline("xvlm-vqa", model=vqa_model, processor=vqa_processor)
    assert isinstance(vqa, XVLMVisualQuestionAnsweringPipeline)
    question = QUESTIONS[0]
    result = vqa(images[0], question, candidate_answers=ANSWERS, top_k=3)
    expected = direct_ranking(vqa_model, vqa_processor, images[0], question, ANSWERS, top_k=3)[0]
    same_answers(result, expected)
    scores = [r["score"] for r in result]
    assert len(result) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    # top_k defaults to 1; every candidate when top_k covers them all (softmax over all of them: sums to 1)
    same_answers(vqa(images[0], question, candidate_answers=ANSWERS), expected[:1])
    everything = vqa(images[0], question, candidate_answers=ANSWERS, top_k=len(ANSWERS))
    assert sorted(r["answer"] for r in everything) == sorted(ANSWERS)
    assert sum(r["score"] for r in everything) == pytest.approx(1.0, abs=1e-5)
    # k_test (re-scored candidates) and the scoring switch reach rank_answers
    for kwargs in ({"k": 3}, {"official_answer_scoring": False}):
        options = {"k_test": 3} if "k" in kwargs else kwargs
        got = vqa(images[0], question, candidate_answers=ANSWERS, top_k=3, **options)
        same_answers(got, direct_ranking(vqa_model, vqa_processor, images[0], question, ANSWERS, top_k=3, **kwargs)[0])
    assert len(vqa(images[0], question, candidate_answers=ANSWERS, top_k=5, k_test=2)) == 2


def test_vqa_batching_input_forms_and_single_encoding(vqa_model, vqa_processor, images, monkeypatch) -> None:
    vqa = pipeline("xvlm-vqa", model=vqa_model, processor=vqa_processor)
    singles = [vqa(image, q, candidate_answers=ANSWERS, top_k=2) for image, q in zip(images, QUESTIONS)]
    expected = direct_ranking(vqa_model, vqa_processor, images, QUESTIONS, ANSWERS, top_k=2)
    calls = []
    encode = vqa_processor.encode_answers
    monkeypatch.setattr(vqa_processor, "encode_answers", lambda answers: calls.append(answers) or encode(answers))
    batched = vqa(images, QUESTIONS, candidate_answers=ANSWERS, top_k=2, batch_size=2)
    assert calls == [ANSWERS]  # the candidates are tokenised once per call, not per batch
    as_dicts = vqa([{"image": i, "question": q} for i, q in zip(images, QUESTIONS)], candidate_answers=ANSWERS,
                   top_k=2, batch_size=3)
    assert len(batched) == len(as_dicts) == len(images)
    for e, *got in zip(expected, singles, batched, as_dicts):
        for answers in got:
            same_answers(answers, e)
    several = vqa(images[0], QUESTIONS[:2], candidate_answers=ANSWERS)
    assert len(several) == 2 and all(len(r) == 1 for r in several)
    same_answers(several[1], direct_ranking(vqa_model, vqa_processor, images[0], QUESTIONS[1], ANSWERS)[0])
    # Candidates given at construction apply to every call.
    fixed = pipeline("xvlm-vqa", model=vqa_model, processor=vqa_processor, candidate_answers=ANSWERS, top_k=2)
    same_answers(fixed(images[2], QUESTIONS[2]), expected[2])


def test_vqa_questions_are_cleaned_as_questions(vqa_model, processor, vqa_processor, images) -> None:
    """Whatever the processor's default (here a caption processor), questions get the official pre_question."""
    question = "Is the  <person> on the left?"  # pre_caption would collapse the spaces and rewrite <person>
    vqa = pipeline("xvlm-vqa", model=vqa_model, processor=processor)
    inputs = vqa.preprocess({"image": images[0], "question": question})
    expected = vqa_processor(text=question)
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
    assert inputs["input_ids"].tolist() != processor(text=question)["input_ids"].tolist()


def test_vqa_argument_errors(vqa_model, vqa_processor, retrieval_model, processor, images) -> None:
    vqa = pipeline("xvlm-vqa", model=vqa_model, processor=vqa_processor)
    with pytest.raises(ValueError, match="candidate_answers=\\[...\\]"):
        vqa(images[0], QUESTIONS[0])
    for bad in ([], "red", ["red", ""], ["red", 3]):
        with pytest.raises(ValueError, match="candidate_answers must be"):
            vqa(images[0], QUESTIONS[0], candidate_answers=bad)
    with pytest.raises(ValueError, match="3 images but 2 questions"):
        vqa(images, QUESTIONS[:2], candidate_answers=ANSWERS)
    with pytest.raises(ValueError, match="question must be a string"):
        vqa({"image": images[0], "question": 3}, candidate_answers=ANSWERS)
    with pytest.raises(ValueError, match="top_k"):
        vqa(images[0], QUESTIONS[0], candidate_answers=ANSWERS, top_k=0)
    with pytest.raises(ValueError, match="needs XVLMForQuestionAnswering"):
        pipeline("xvlm-vqa", model=retrieval_model, processor=processor)


def test_vqa_from_a_saved_folder_and_saved_pipeline(vqa_model, vqa_processor, vqa_folder, images, tmp_path) -> None:
    vqa = pipeline("xvlm-vqa", model=str(vqa_folder))
    assert type(vqa.model) is XVLMForQuestionAnswering and type(vqa.processor) is XVLMProcessor
    expected = direct_ranking(vqa_model, vqa_processor, images[1], QUESTIONS[1], ANSWERS, top_k=2)[0]
    same_answers(vqa(images[1], QUESTIONS[1], candidate_answers=ANSWERS, top_k=2), expected)
    vqa.save_pretrained(tmp_path)
    custom = json.loads((tmp_path / "config.json").read_text())["custom_pipelines"]
    assert custom["xvlm-vqa"] == {
        "impl": "pipelines.XVLMVisualQuestionAnsweringPipeline",
        "pt": ["AutoModelForVisualQuestionAnswering"],
        "type": "multimodal",
    }
    assert (tmp_path / "pipelines.py").is_file() and (tmp_path / "modeling_xvlm_vqa.py").is_file()


# ------------------------------------------------------------------------------------------ captioning

PROMPT = "a picture of "


@pytest.fixture(scope="module")
def caption_model(tiny_tokenizer) -> XVLMForConditionalGeneration:
    """A random captioner with spread-out logits (init std 0.2), so that different images get different captions."""
    text = {"vocab_size": len(tiny_tokenizer), "bos_token_id": tiny_tokenizer.cls_token_id,
            "eos_token_id": tiny_tokenizer.sep_token_id, "initializer_range": 0.2}
    config = XVLMConfig.from_preset("tiny", text_config=text, initializer_range=0.2)
    torch.manual_seed(3)
    return XVLMForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def caption_folder(caption_model, processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioning")
    caption_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def direct_captions(model, processor, images, **kwargs) -> tuple[torch.Tensor, list[str]]:
    """The model API: the official prompt, `generate` (official beam search) and the official decoding."""
    pixel_values = processor(images=images)["pixel_values"]
    generated = model.generate(pixel_values, input_ids=processor.caption_prompt(len(pixel_values)), **kwargs)
    return generated, processor.post_process_captions(generated)


def test_image_text_to_text_captions(caption_model, processor, caption_folder, images) -> None:
    """transformers' own pipeline, loaded from a saved captioning folder: `XVLMForConditionalGeneration.generate`
    from the official prompt, the prompt cut from the caption by the processor."""
    captioner = pipeline("image-text-to-text", model=str(caption_folder))
    assert type(captioner) is ImageTextToTextPipeline
    assert type(captioner.model) is XVLMForConditionalGeneration and type(captioner.processor) is XVLMProcessor
    generated, (caption,) = direct_captions(caption_model, processor, images[0])
    assert generated.shape[1] <= 20 and caption  # the official 20 tokens with the prompt; the tiny model speaks
    alone = captioner(images[0], text=PROMPT, return_full_text=False)
    assert alone == [{"input_text": PROMPT, "generated_text": caption}]
    # transformers' default (`return_full_text=True`): the prompt, then the caption
    assert captioner(images[0], text=PROMPT) == [{"input_text": PROMPT, "generated_text": PROMPT + caption}]
    tokens = captioner(images[0], text=PROMPT, return_tensors=True)[0]["generated_token_ids"]
    assert tokens.tolist() == generated[0].tolist()
    # several images: one prompt each, batched generate
    _, captions = direct_captions(caption_model, processor, images)
    assert len(set(captions)) > 1  # the captions depend on the image
    batch = captioner(images, text=[PROMPT] * 3, return_full_text=False)
    assert batch == [{"input_text": PROMPT, "generated_text": c} for c in captions]
    # transformers' pipeline needs a text (XVLMImageTextToTextPipeline supplies the prompt)
    with pytest.raises(ValueError, match="You must provide text"):
        captioner(images[0])


def test_image_text_to_text_caption_generation_arguments(caption_model, processor, images) -> None:
    captioner = pipeline("image-text-to-text", model=caption_model, processor=processor)
    for kwargs in ({"num_beams": 1}, {"num_beams": 2, "max_length": 8}, {"official_beam_scoring": False}):
        got = captioner(images[1], text=PROMPT, return_full_text=False, generate_kwargs=kwargs)[0]["generated_text"]
        generated, (expected,) = direct_captions(caption_model, processor, images[1], **kwargs)
        assert got == expected, kwargs
    assert generated.shape[1] <= 20
    generated, (expected,) = direct_captions(caption_model, processor, images[1], max_new_tokens=3)
    assert generated.shape[1] <= 4 + 3
    assert captioner(images[1], text=PROMPT, max_new_tokens=3, return_full_text=False)[0]["generated_text"] == expected


def test_image_text_to_text_loads_the_head_of_the_folder(caption_folder, vqa_folder) -> None:
    """One Auto class, two heads on one config class: the folder's `architectures` picks the head."""
    assert type(AutoModelForImageTextToText.from_pretrained(caption_folder)) is XVLMForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(vqa_folder)) is XVLMForQuestionAnswering
    assert type(pipeline("image-text-to-text", model=str(vqa_folder)).model) is XVLMForQuestionAnswering


def test_default_caption_prompt_pipeline(caption_model, processor, vqa_model, vqa_processor, images) -> None:
    """`XVLMImageTextToTextPipeline` (opt-in): no text means the processor's caption prompt."""
    captioner = pipeline("image-text-to-text", model=caption_model, processor=processor,
                         pipeline_class=XVLMImageTextToTextPipeline)
    assert isinstance(captioner, ImageTextToTextPipeline)
    _, captions = direct_captions(caption_model, processor, images)
    assert captioner(images[0], return_full_text=False) == [{"input_text": PROMPT, "generated_text": captions[0]}]
    assert captioner(images[0]) == captioner(images[0], text=PROMPT)
    assert captioner(images, return_full_text=False) == [{"input_text": PROMPT, "generated_text": c} for c in captions]
    # an explicit text wins
    other = captioner(images[0], text="a photo of ", return_full_text=False)
    assert other[0]["input_text"] == "a photo of "
    # a VQA head has no default question
    answerer = pipeline("image-text-to-text", model=vqa_model, processor=vqa_processor,
                        pipeline_class=XVLMImageTextToTextPipeline)
    with pytest.raises(ValueError, match="XVLMForQuestionAnswering answers questions: pass the question"):
        answerer(images[0])
    assert answerer(images[0], text=QUESTIONS[0]) == pipeline(
        "image-text-to-text", model=vqa_model, processor=vqa_processor)(images[0], text=QUESTIONS[0])


def test_default_caption_prompt_from_a_path_and_the_processor_prompt(caption_model, processor, images,
                                                                     tmp_path) -> None:
    path = tmp_path / "image.png"
    images[2].save(path)
    custom = XVLMProcessor(processor.image_processor, processor.tokenizer, prompt="a photo of ")
    captioner = pipeline("image-text-to-text", model=caption_model, processor=custom,
                         pipeline_class=XVLMImageTextToTextPipeline)
    result = captioner(str(path), return_full_text=False)[0]
    pixel_values = custom(images=Image.open(path))["pixel_values"]
    generated = caption_model.generate(pixel_values, input_ids=custom.caption_prompt(1))
    assert result == {"input_text": "a photo of ", "generated_text": custom.post_process_captions(generated)[0]}
    empty = XVLMProcessor(processor.image_processor, processor.tokenizer, prompt="")
    captioner = pipeline("image-text-to-text", model=caption_model, processor=empty,
                         pipeline_class=XVLMImageTextToTextPipeline)
    with pytest.raises(ValueError, match="caption prompt is empty"):
        captioner(images[0])


def test_xvlm_pipelines_batch_right_padded_whatever_the_tokenizer_side(vqa_model, vqa_processor, images) -> None:
    """transformers' image-text-to-text pipeline switches a tokenizer it is given to left padding (decoder models,
    transformers >= 5.25); the X-VLM pipelines still collate right-padded batches ([CLS] at position 0, as the
    official code) and leave the tokenizer's side as they found it."""
    expected = direct_ranking(vqa_model, vqa_processor, images, QUESTIONS, ANSWERS, top_k=2)
    vqa = pipeline("xvlm-vqa", model=vqa_model, processor=vqa_processor)
    vqa_processor.tokenizer.padding_side = "left"
    try:
        batched = vqa(images, QUESTIONS, candidate_answers=ANSWERS, top_k=2, batch_size=len(images))
        assert vqa_processor.tokenizer.padding_side == "left"
    finally:
        vqa_processor.tokenizer.padding_side = "right"
    assert len({len(q.split()) for q in QUESTIONS}) > 1  # questions of different lengths: the batch is padded
    for got, want in zip(batched, expected):
        same_answers(got, want)
