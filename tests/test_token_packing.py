"""Padding-free text and fusion layers (`token_packing.PackedLayout`, `text_config.padding_free`): the layout, and
the real tokens' outputs of every text-stack mode against the padded computation (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from modeling_xvlm import XVLMConfig, XVLMModel
from modeling_xvlm.token_packing import PackedLayout

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_layout_of_a_right_padded_mask_packs_and_unpacks():
    mask = _mask([3, 1, 4], 4)
    layout = PackedLayout.from_mask(mask)
    assert layout is not None and (layout.batch, layout.length, layout.tokens) == (3, 4, 8)
    assert layout.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    states = torch.randn(3, 4, 5)
    packed = layout.pack(states)
    assert torch.equal(packed, states[mask.bool()])
    unpacked = layout.unpack(packed)
    assert torch.equal(unpacked[mask.bool()], states[mask.bool()]) and not unpacked[~mask.bool()].any()


@pytest.mark.parametrize(
    "mask",
    [
        torch.ones(2, 5, dtype=torch.long),  # nothing padded
        torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),  # left padding
        torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]]),  # a hole
        torch.tensor([[1, 1, 0], [0, 0, 0]]),  # an empty row
        torch.ones(3, 1, dtype=torch.long),  # one position
        torch.ones(1, 1, 1, 4),  # an additive 4-D mask
        None,
    ],
    ids=["unpadded", "left-padded", "hole", "empty-row", "length-1", "4d", "none"],
)
def test_masks_that_are_not_right_padding_keep_the_padded_computation(mask):
    assert PackedLayout.from_mask(mask) is None


def _model(**text) -> XVLMModel:
    torch.manual_seed(0)
    config = XVLMConfig.from_preset(
        "tiny", text_config={"num_hidden_layers": 4, "fusion_layer": 2, "hidden_dropout_prob": 0.0,
                             "attention_probs_dropout_prob": 0.0, **text}
    )
    return XVLMModel(config).eval()


def _inputs(model: XVLMModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = _mask([9, 4, 1, 7], 9)
    ids = torch.randint(5, model.config.text_config.vocab_size, mask.shape, generator=g).masked_fill(mask == 0, 0)
    ids[:, 0] = 2
    size = model.config.image_size
    return ids, mask, torch.randn(4, 3, size, size, generator=g)


def _both(model: XVLMModel, run):
    """`run()` with the padding-free layers, then with the padded computation."""
    outputs = []
    for padding_free in (True, False):
        model.text_model.config.padding_free = padding_free
        with torch.no_grad():
            outputs.append(run())
    model.text_model.config.padding_free = True
    return outputs


def test_text_fusion_and_multimodal_modes_equal_the_padded_computation_on_real_tokens():
    model = _model()
    ids, mask, pixels = _inputs(model)
    real = mask.bool()
    with torch.no_grad():
        image = model.encode_image(pixels).last_hidden_state

    def run():
        text = model.encode_text(ids, mask).last_hidden_state
        fused = model.text_model.fuse(text, mask, image).last_hidden_state
        cls = model.text_model.fuse(text, mask, image, cls_only=True).last_hidden_state
        shared = model.text_model.fuse(text, mask, image[:2], image_index=torch.tensor([1, 0, 0, 1]))
        two_images = model.text_model.fuse(text, mask, [image, image.flip(0)])  # NLVR2's alternating sequences
        multimodal = model.text_model(ids, mask, encoder_hidden_states=image).last_hidden_state
        return text, fused, cls, shared.last_hidden_state, two_images.last_hidden_state, multimodal

    packed, padded = _both(model, run)
    assert packed[2].shape == (4, 1, model.config.text_config.hidden_size)
    assert (packed[2] - padded[2]).abs().max() <= TOL  # the [CLS]-only last layer
    for ours, reference in zip(packed[:2] + packed[3:], padded[:2] + padded[3:]):
        assert (ours[real] - reference[real]).abs().max() <= TOL
        assert not ours[~real].any()  # padded positions are 0
        assert reference[~real].abs().max() > 0.1  # the padded computation does compute them


def test_padded_path_is_used_when_per_layer_outputs_are_recorded():
    """Recorded hidden states and attentions (Grad-CAM reads the padded rows') are those of the padded layers."""
    model = _model()
    ids, mask, pixels = _inputs(model)
    with torch.no_grad():
        image = model.encode_image(pixels).last_hidden_state

    def run():
        text = model.text_model(ids, mask, output_hidden_states=True)
        fused = model.text_model.fuse(text.last_hidden_state, mask, image, output_attentions=True)
        return text.hidden_states, fused.cross_attentions, fused.last_hidden_state

    packed, padded = _both(model, run)
    for ours, reference in zip(packed[0] + packed[1] + (packed[2],), padded[0] + padded[1] + (padded[2],)):
        assert torch.equal(ours, reference)


def test_padding_free_gradients_equal_the_padded_ones_with_gradient_checkpointing():
    model = _model()
    ids, mask, pixels = _inputs(model)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    grads = []
    for padding_free in (True, False):
        model.text_model.config.padding_free = padding_free
        model.zero_grad(set_to_none=True)
        text = model.encode_text(ids, mask).last_hidden_state
        image = model.encode_image(pixels).last_hidden_state
        fused = model.text_model.fuse(text, mask, image).last_hidden_state
        (fused[mask.bool()].square().mean() + text[:, 0].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= TOL


def test_the_switch_is_saved_and_can_be_turned_off_on_load(tmp_path):
    model = _model()
    assert model.config.text_config.padding_free is True  # the default
    model.save_pretrained(tmp_path)
    off = XVLMModel.from_pretrained(tmp_path, text_config={"padding_free": False})
    assert off.text_model.config.padding_free is False
    off.config.text_config.padding_free = False
    off.save_pretrained(tmp_path / "off")
    assert XVLMModel.from_pretrained(tmp_path / "off").text_model.config.padding_free is False


def test_right_align_rotates_left_padded_rows_only():
    from modeling_xvlm.token_packing import leading_padding, right_align

    ids = torch.tensor([[0, 0, 2, 7, 8], [2, 5, 6, 7, 8], [0, 2, 9, 4, 3]])
    mask = (ids != 0).long()
    assert leading_padding(mask).tolist() == [2, 0, 1]
    aligned, aligned_mask = right_align(ids, mask)
    assert aligned.tolist() == [[2, 7, 8, 0, 0], [2, 5, 6, 7, 8], [2, 9, 4, 3, 0]]
    assert aligned_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    for other in ([[1, 1, 0], [1, 0, 0]], [[0, 1, 0], [1, 1, 1]], [[0, 0, 0], [0, 1, 1]], [[1, 1, 1], [1, 1, 1]]):
        other = torch.tensor(other)  # right-padded, holes, an empty row, no padding: unchanged
        assert leading_padding(other) is None and right_align(other, other)[1] is other
    assert right_align(ids, None) == (ids, None)
