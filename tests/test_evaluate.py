"""Evaluation metrics on known predictions, and the ``xvlm-eval`` command."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from modeling_xvlm.training import evaluate as ev


def test_grounding_accuracy_inclusive_pixel_iou():
    gt = torch.tensor([[10.0, 10.0, 20.0, 20.0]] * 3)
    pred = torch.tensor([[10.0, 10.0, 20.0, 20.0],  # IoU 1
                         [15.0, 10.0, 20.0, 20.0],  # inclusive inter 15 x 20 = 300, union 500 -> 0.6
                         [20.0, 10.0, 20.0, 20.0]])  # inter 10 x 20 = 200, union 600 -> 1/3
    result = ev.grounding_accuracy(gt, pred, ["testA", "testA", "testB"])
    assert result["acc@0.5"] == pytest.approx(200 / 3)
    assert result["mean_iou"] == pytest.approx((1 + 0.6 + 1 / 3) / 3)
    assert result["groups"] == {"testA": {"acc@0.5": 100.0, "num_examples": 2},
                                "testB": {"acc@0.5": 0.0, "num_examples": 1}}
    assert "groups" not in ev.grounding_accuracy(gt, pred, ["", "", ""])


def _processor():
    from modeling_xvlm.data import synthetic_tokenizer
    from modeling_xvlm.processing import XVLMImageProcessorPil, XVLMProcessor

    return XVLMProcessor(image_processor=XVLMImageProcessorPil(size={"height": 64, "width": 64}, patch_size=8),
                         tokenizer=synthetic_tokenizer())


def test_evaluate_grounding_maps_boxes_back_to_pixels(monkeypatch):
    """Predicting exactly the (normalised) targets gives Acc@0.5 = 100 after the mapping to original pixels."""
    rows = [
        {"image": Image.new("RGB", (160, 96)), "text": "the red circle", "bbox": [12.0, 30.0, 40.0, 40.0], "group": "seen"},
        {"image": Image.new("RGB", (100, 128)), "text": "the blue square", "bbox": [50.0, 8.0, 30.0, 30.0], "group": "heldout"},
    ]
    shift = {"dx": 0.0}

    def fake_predict(model, batch):
        target = ev._current_labels.clone()
        target[:, 0] += shift["dx"]
        return target

    original_collator = ev.XVLMGroundingCollator

    class RecordingCollator(original_collator):
        def __call__(self, rows):
            out = super().__call__(rows)
            ev._current_labels = out["labels"]
            return out

    monkeypatch.setattr(ev, "XVLMGroundingCollator", RecordingCollator)
    monkeypatch.setattr(ev, "_predict_boxes", fake_predict)
    model = torch.nn.Linear(1, 1)
    result = ev.evaluate_grounding(model, _processor(), rows, return_predictions=True)
    assert result["acc@0.5"] == 100.0 and result["mean_iou"] > 0.9
    assert result["predictions"][0] == pytest.approx([12.0, 30.0, 40.0, 40.0], abs=1e-3)
    assert set(result["groups"]) == {"seen", "heldout"} and 0 <= result["prior_baseline"] <= 100
    shift["dx"] = 0.3  # move every box 30 % of the image width: no overlap left
    assert ev.evaluate_grounding(model, _processor(), rows)["acc@0.5"] == 0.0


class _OracleXVLM:
    """Features that identify image i (solid grey level 20 i) and captions naming colour i: a perfect ranker."""

    def __init__(self, processor, colours, reverse=False):
        self.processor, self.reverse = processor, reverse
        self.word_ids = [processor.tokenizer.convert_tokens_to_ids(c) for c in colours]

    def _one_hot(self, index, n):
        return torch.nn.functional.one_hot(index, n).float()

    def get_image_features(self, pixel_values):
        ip = self.processor.image_processor
        grey = pixel_values[:, 0].mean(dim=(1, 2)) * ip.image_std[0] + ip.image_mean[0]
        index = torch.round(grey * 255 / 20).long()
        feats = self._one_hot(index, len(self.word_ids))
        return SimpleNamespace(last_hidden_state=feats[:, None, :], pooler_output=feats)

    def get_text_features(self, input_ids, attention_mask):
        index = torch.tensor([self.word_ids.index(int(t)) for t in input_ids[:, 2]])
        if self.reverse:
            index = len(self.word_ids) - 1 - index
        feats = self._one_hot(index, len(self.word_ids))
        return SimpleNamespace(last_hidden_state=feats[:, None, :], pooler_output=feats)


    def fuse(self, text_embeds, attention_mask, image_embeds, image_attention_mask=None, image_index=None,
             cls_only=False):
        images = image_embeds if image_index is None else image_embeds[image_index]
        return images[:, :1] * text_embeds[:, :1]  # "fused [CLS]": the product of the two one-hot features


class _OracleModel(torch.nn.Module):
    """Any model with ``xvlm`` + ``itm_head`` is evaluated (``modeling_xvlm.retrieval.itm_scores``)."""

    def __init__(self, xvlm):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.xvlm = xvlm

    def itm_head(self, cls):  # class 1 ("match"): the agreement of image and text
        return torch.stack([torch.zeros_like(cls[:, 0]), cls.sum(-1)], dim=-1)


@pytest.mark.parametrize("reverse", [False, True])
def test_evaluate_retrieval_known_ranking(reverse):
    colours = ["red", "green", "blue", "yellow", "purple", "white"]
    processor = _processor()
    rows = [{"image": Image.new("RGB", (32, 32), (20 * i,) * 3), "captions": [f"a {c} circle", f"the {c} shape"]}
            for i, c in enumerate(colours)]
    model = _OracleModel(_OracleXVLM(processor, colours, reverse=reverse))
    metrics = ev.evaluate_retrieval(model, processor, rows, k_test=3, batch_size=4)
    assert metrics["num_images"] == 6 and metrics["num_texts"] == 12
    expected = 0.0 if reverse else 100.0
    for key in ("txt_r1", "img_r1", "itc_txt_r1", "itc_img_r1"):
        assert metrics[key] == expected, key
    assert metrics["chance"] == {"txt_r1": pytest.approx(100 * 2 / 12), "img_r1": pytest.approx(100 / 6)}
    assert set(metrics) >= {"txt_r5", "txt_r10", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean"}


def test_xvlm_eval_cli(tmp_path, capsys):
    from modeling_xvlm import XVLMConfig, XVLMForGrounding, XVLMForRetrieval
    from modeling_xvlm.data import SyntheticConfig, write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(num_train=4, num_validation=4, num_test=6), overwrite=True)
    processor = _processor()
    config = XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(processor.tokenizer)})
    printed = ""
    for name, cls in (("retrieval", XVLMForRetrieval), ("grounding", XVLMForGrounding)):
        cls(config).save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        out = tmp_path / f"{name}.json"
        for progress in ("--progress", "--no-progress"):
            assert ev.main([name, "--model", str(tmp_path / name), "--dataset", str(data), "--output", str(out),
                            "--k-test", "4", progress]) == 0
            captured = capsys.readouterr()
            printed += captured.out
            # progress bars (stderr): encoding and re-ranking for retrieval, the batches for grounding
            bars = ("encode images", "encode texts", "ITM re-ranking") if name == "retrieval" else ("grounding:",)
            for bar in bars:
                assert (bar in captured.err) == (progress == "--progress"), (bar, progress, captured.err)
        metrics = json.loads(out.read_text())
        key = "r_mean" if name == "retrieval" else "acc@0.5"
        assert 0 <= metrics[key] <= 100 and metrics["split"] == "test"
    assert "R@1" in printed and "Acc@0.5" in printed and "chance" in printed


def test_evaluate_retrieval_bf16_keeps_fp32_top1(tmp_path):
    """bf16 re-ranking on fp32 encoders gives the fp32 R@1 (near ties re-scored in fp32); full bf16 runs too."""
    from modeling_xvlm import XVLMConfig, XVLMForRetrieval
    from modeling_xvlm.data import SyntheticConfig, load_xvlm_dataset, write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(num_train=4, num_validation=4, num_test=12), overwrite=True)
    rows = load_xvlm_dataset(str(data), "retrieval", "test")
    processor = _processor()
    torch.manual_seed(0)
    model = XVLMForRetrieval(XVLMConfig.from_preset("tiny", text_config={"vocab_size": len(processor.tokenizer)}))
    with torch.no_grad():
        model.itm_head[-1].weight.mul_(50.0)  # spread the random ITM logits
    fp32 = ev.evaluate_retrieval(model, processor, rows, k_test=4)
    mixed = ev.evaluate_retrieval(model, processor, rows, k_test=4, precision="bf16", encode_precision="fp32")
    full = ev.evaluate_retrieval(model, processor, rows, k_test=4, precision="bf16")
    assert fp32["precision"] == "fp32" and fp32["pairs_refined_fp32"] == 0
    assert (mixed["precision"], mixed["encode_precision"]) == ("bf16", "fp32") and mixed["pairs_refined_fp32"] > 0
    assert (mixed["txt_r1"], mixed["img_r1"]) == (fp32["txt_r1"], fp32["img_r1"])
    assert mixed["itc_r_mean"] == fp32["itc_r_mean"]
    assert full["encode_precision"] == "bf16" and 0 <= full["r_mean"] <= 100
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):
        ev.evaluate_retrieval(model, processor, rows, precision="fp16")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "bf16.json"
    assert ev.main(["retrieval", "--model", str(tmp_path / "model"), "--dataset", str(data), "--k-test", "4",
                    "--precision", "bf16", "--encode-precision", "fp32", "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert (saved["txt_r1"], saved["img_r1"]) == (fp32["txt_r1"], fp32["img_r1"])
