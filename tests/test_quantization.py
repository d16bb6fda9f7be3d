"""Int8 dynamic quantization for CPU inference (`modeling_xvlm.quantize_int8`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeling_xvlm import (
    XVLMConfig,
    XVLMForConditionalGeneration,
    XVLMForGrounding,
    XVLMForImagesAndTextClassification,
    XVLMForQuestionAnswering,
    XVLMForRetrieval,
    XVLMModel,
    quantize_int8,
)
from modeling_xvlm.modeling_xvlm_nlvr import nlvr2_config
from modeling_xvlm.quantization import is_int8_quantized

pytestmark = pytest.mark.usefixtures("one_thread")
DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


def _config(**text) -> XVLMConfig:
    return XVLMConfig.from_preset("tiny", text_config={"bos_token_id": 2, "eos_token_id": 3, **text})


def _linears(module: nn.Module) -> tuple[int, int]:
    """`(fp32 nn.Linear, int8 dynamic Linear)` counts in `module`."""
    modules = list(module.modules())
    return (sum(type(m) is nn.Linear for m in modules), sum(isinstance(m, DynamicLinear) for m in modules))


def _close(reference: torch.Tensor, quantized: torch.Tensor) -> None:
    """Quantized, so not equal; within a few percent of the fp32 values' scale."""
    assert quantized.shape == reference.shape and quantized.dtype == reference.dtype
    assert not torch.equal(quantized, reference)
    assert (quantized - reference).abs().max() <= 0.05 * reference.abs().max() + 1e-4


def test_only_the_text_fusion_and_decoder_linears_are_quantized():
    torch.manual_seed(0)
    for model, stacks in ((XVLMForRetrieval(_config()), ["xvlm.text_model"]),
                          (XVLMForQuestionAnswering(_config()), ["xvlm.text_model", "text_decoder"]),
                          (XVLMForConditionalGeneration(_config()), ["text_decoder"])):
        quantized = quantize_int8(model)
        assert is_int8_quantized(quantized) and not is_int8_quantized(model)
        assert not quantized.training
        for name in stacks:
            fp32, int8 = _linears(quantized.get_submodule(name))
            assert fp32 == 0 and int8 == _linears(model.get_submodule(name))[0] > 0, name
        # the copy leaves the original alone; vision and heads stay fp32
        assert _linears(model)[1] == 0
        vision = quantized.xvlm.vision_model if hasattr(quantized, "xvlm") else quantized.vision_model
        assert _linears(vision)[1] == 0
        if hasattr(quantized, "itm_head"):
            assert _linears(quantized.itm_head) == (2, 0)


def test_quantized_heads_stay_close_to_fp32(tiny_inputs):
    torch.manual_seed(0)
    retrieval = XVLMForRetrieval(_config()).eval()
    grounding = XVLMForGrounding(_config()).eval()
    with torch.no_grad():
        for model, key in ((retrieval, "itm_logits"), (grounding, "pred_boxes")):
            reference, quantized = model(**tiny_inputs)[key], quantize_int8(model)(**tiny_inputs)[key]
            _close(reference, quantized)
        features = XVLMModel(_config()).eval()
        text = features.get_text_features(tiny_inputs["input_ids"], tiny_inputs["attention_mask"]).pooler_output
        _close(text, quantize_int8(features).get_text_features(tiny_inputs["input_ids"],
                                                                 tiny_inputs["attention_mask"]).pooler_output)
        # image features do not go through the text stack: unchanged
        image = features.get_image_features(tiny_inputs["pixel_values"]).pooler_output
        assert torch.equal(quantize_int8(features).get_image_features(tiny_inputs["pixel_values"]).pooler_output,
                           image)
    ranking = quantize_int8(retrieval).rank(tiny_inputs["pixel_values"], tiny_inputs["input_ids"],
                                            tiny_inputs["attention_mask"], k=2)
    assert ranking.i2t_indices.shape == (2, 2)


def test_quantized_nlvr2_vqa_and_captioning_run_their_inference(tiny_inputs):
    torch.manual_seed(0)
    nlvr2 = XVLMForImagesAndTextClassification(nlvr2_config(_config())).eval()
    pairs = torch.stack([tiny_inputs["pixel_values"], tiny_inputs["pixel_values"].flip(0)], dim=1)
    with torch.no_grad():
        reference = nlvr2(pixel_values=pairs, input_ids=tiny_inputs["input_ids"],
                          attention_mask=tiny_inputs["attention_mask"]).logits
        _close(reference, quantize_int8(nlvr2)(pixel_values=pairs, input_ids=tiny_inputs["input_ids"],
                                               attention_mask=tiny_inputs["attention_mask"]).logits)
    vqa = quantize_int8(XVLMForQuestionAnswering(_config()))
    candidates = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3], [2, 10, 3, 0]])
    ranking = vqa.rank_answers(**tiny_inputs, answer_input_ids=candidates, answer_attention_mask=(candidates != 0).long(),
                               k=2)
    assert ranking.candidate_indices.shape == (2, 2)
    torch.testing.assert_close(ranking.probabilities.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    captioner = quantize_int8(XVLMForConditionalGeneration(_config()))
    prompts = torch.full((2, 1), 2)
    tokens = captioner.generate(tiny_inputs["pixel_values"], input_ids=prompts, max_length=6, num_beams=2)
    assert tokens.shape[0] == 2 and tokens.shape[1] <= 6 and bool((tokens[:, 0] == 2).all())


def test_quantize_int8_refuses_what_it_cannot_do(tmp_path):
    model = XVLMForRetrieval(_config())
    quantized = quantize_int8(model, inplace=True)
    assert quantized is model
    with pytest.raises(ValueError, match="int8-quantized already"):
        quantize_int8(model)
    with pytest.raises(ValueError, match="cannot be saved.*save the fp32 model"):
        model.save_pretrained(tmp_path / "int8")
    with pytest.raises(ValueError, match="needs an fp32 model, got torch.bfloat16"):
        quantize_int8(XVLMForRetrieval(_config()).to(torch.bfloat16))
    with pytest.raises(ValueError, match="has no text_model or text_decoder"):
        quantize_int8(nn.Sequential(nn.Linear(2, 2)))


def test_xvlm_eval_int8(tmp_path, capsys):
    """`xvlm-eval --int8` evaluates the quantized model (CPU) and records it; on another device it refuses."""
    import json

    from modeling_xvlm.data import SyntheticConfig, synthetic_tokenizer, write_synthetic_dataset
    from modeling_xvlm.processing import XVLMProcessor
    from modeling_xvlm.training import evaluate as ev

    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(num_train=4, num_validation=4, num_test=6))
    tokenizer = synthetic_tokenizer()
    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(tokenizer)})
    XVLMForRetrieval(config).save_pretrained(tmp_path / "model")
    XVLMProcessor.from_model_config(config, tokenizer=tokenizer).save_pretrained(tmp_path / "model")
    out = tmp_path / "int8.json"
    argv = ["retrieval", "--model", str(tmp_path / "model"), "--dataset", str(data), "--k-test", "4", "--no-progress"]
    assert ev.main([*argv, "--int8", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["int8"] is True and 0 <= metrics["r_mean"] <= 100 and metrics["num_texts"] > 0
    assert ev.main([*argv, "--int8", "--device", "meta"]) == 2
    assert "--int8 runs on the CPU only" in capsys.readouterr().err
