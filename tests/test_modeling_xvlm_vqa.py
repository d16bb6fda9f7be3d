"""XVLMForQuestionAnswering: the official VQA loss, the answer ranking and its scoring switch, generation, saving.

Parity of a converted official checkpoint with the official computation is in tests/test_conversion_vqa.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_xvlm import XVLMConfig, XVLMForQuestionAnswering
from modeling_xvlm.modeling_xvlm_vqa import vqa_decoder_config

pytestmark = pytest.mark.usefixtures("one_thread")

CLS, SEP, PAD = 2, 3, 0


def _config(**kwargs) -> XVLMConfig:
    text = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "bos_token_id": CLS, "eos_token_id": SEP}
    # Vision width 16 != text width 32, as in X-VLM-base (1024 vs 768).
    return XVLMConfig.from_preset("tiny", text_config=text, vision_config={"embed_dim": 8}, **kwargs)


@pytest.fixture
def model() -> XVLMForQuestionAnswering:
    torch.manual_seed(0)
    return XVLMForQuestionAnswering(_config()).eval()


def _answers(rows: list[list[int]]) -> torch.Tensor:
    """`[CLS] tokens [SEP]` padded with PAD."""
    width = max(len(r) for r in rows) + 2
    return torch.tensor([[CLS, *r, SEP] + [PAD] * (width - len(r) - 2) for r in rows])


def _candidates(n: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return _answers([torch.randint(5, 60, (1 + i % 3,), generator=generator).tolist() for i in range(n)])


def _token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ids[:, 1:] under logits[:, :-1], padding excluded (computed here, not by the model)."""
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return -(logp * (ids[:, 1:] != PAD)).sum(1)


def test_decoder_config_follows_the_official_vqa_decoder():
    config = _config()
    decoder = vqa_decoder_config(config)
    assert decoder.is_decoder and decoder.fusion_layer == 0
    assert decoder.num_hidden_layers == config.text_config.num_fusion_layers
    assert decoder.encoder_width == config.text_config.hidden_size != config.vision_width
    assert vqa_decoder_config(_config(num_decoder_layers=3)).num_hidden_layers == 3
    with pytest.raises(ValueError, match="num_decoder_layers"):
        _config(num_decoder_layers=0)


def test_question_states_without_answers(model, tiny_inputs):
    out = model(**tiny_inputs)
    assert out.loss is None and out.logits is None
    assert out.question_states.shape == (2, 7, model.config.text_config.hidden_size)
    # The question runs through every layer with its image: another image changes the states.
    other = model(**{**tiny_inputs, "pixel_values": tiny_inputs["pixel_values"].flip(0)})
    assert not torch.allclose(out.question_states, other.question_states)


def test_loss_is_the_weighted_answer_nll_over_questions(model, tiny_inputs):
    labels = _answers([[7, 8], [9], [10, 11, 12]])
    weights = torch.tensor([0.7, 0.3, 1.0])
    counts = torch.tensor([2, 1])
    out = model(**tiny_inputs, labels=labels, answer_weights=weights, answers_per_question=counts)
    nll = _token_nll(out.logits, labels)
    assert torch.allclose(out.answer_loss, nll, atol=1e-5)
    assert torch.allclose(out.loss, (weights * nll).sum() / 2, atol=1e-6)
    # Each answer is decoded against its own question's states: the first question alone gives its two answers.
    first = {k: v[:1] for k, v in tiny_inputs.items()}
    alone = model(**first, labels=labels[:2], answers_per_question=torch.tensor([2]))
    assert torch.allclose(alone.answer_loss, out.answer_loss[:2], atol=1e-5)
    # Padding given as -100 or as the pad id is the same target.
    ignored = labels.masked_fill(labels == PAD, -100)
    again = model(**tiny_inputs, labels=ignored, answer_weights=weights, answers_per_question=counts)
    assert torch.allclose(again.loss, out.loss, atol=1e-6)


def test_loss_rule_and_bad_answer_inputs(model, tiny_inputs):
    labels = _answers([[7], [8]])
    assert model(**tiny_inputs, labels=labels, return_loss=False).loss is None
    with pytest.raises(ValueError, match="labels"):
        model(**tiny_inputs, return_loss=True)
    with pytest.raises(ValueError, match="answers_per_question"):
        model(**tiny_inputs, labels=_answers([[7], [8], [9]]))
    with pytest.raises(ValueError, match="summing"):
        model(**tiny_inputs, labels=labels, answers_per_question=torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="answer_weights"):
        model(**tiny_inputs, labels=labels, answer_weights=torch.ones(3))
    with pytest.raises(ValueError, match="labels must be"):
        model(**tiny_inputs, labels=labels[0])
    with pytest.raises(TypeError, match="answer_weight"):
        model(**tiny_inputs, answer_weight=torch.ones(2))


def _reference_ranking(model, tiny_inputs, candidates, k, official):
    """The official rank_answer, written out with the model's decoder as a black box."""
    states = model(**tiny_inputs).question_states
    mask = tiny_inputs["attention_mask"]
    rows = []
    for b in range(states.shape[0]):
        start = model.text_decoder(
            input_ids=candidates[:1, :1], encoder_hidden_states=states[b : b + 1], encoder_attention_mask=mask[b : b + 1]
        ).logits[0, 0]
        first = start.softmax(-1)[candidates[:, 1]]
        top_p, top_i = first.topk(k)
        ids = candidates[top_i]
        logits = model.text_decoder(
            input_ids=ids,
            attention_mask=(ids != PAD).long(),
            encoder_hidden_states=states[b : b + 1].expand(k, -1, -1),
            encoder_attention_mask=mask[b : b + 1].expand(k, -1),
        ).logits
        score = -_token_nll(logits, ids) + (top_p.log() if official else 0)
        probs, order = score.softmax(-1).sort(descending=True)
        rows.append((top_i[order], probs))
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


@pytest.mark.parametrize("official", [True, False])
def test_rank_answers_is_the_official_two_stage_ranking(model, tiny_inputs, official):
    candidates = _candidates()
    ranking = model.rank_answers(
        **tiny_inputs, answer_input_ids=candidates, answer_attention_mask=(candidates != PAD).long(), k=5,
        official_answer_scoring=official,
    )
    indices, probs = _reference_ranking(model, tiny_inputs, candidates, 5, official)
    assert ranking.candidate_indices.shape == ranking.probabilities.shape == (2, 5)
    assert torch.equal(ranking.candidate_indices, indices)
    assert torch.allclose(ranking.probabilities, probs, atol=1e-5)
    assert torch.allclose(ranking.probabilities.sum(-1), torch.ones(2), atol=1e-5)
    assert bool((ranking.probabilities[:, :-1] >= ranking.probabilities[:, 1:]).all())


def test_ranking_switch_defaults_to_the_config_and_k_is_capped(tiny_inputs):
    candidates = _candidates(6)
    mask = (candidates != PAD).long()
    torch.manual_seed(0)
    official = XVLMForQuestionAnswering(_config()).eval()
    corrected = XVLMForQuestionAnswering(_config(official_answer_scoring=False)).eval()
    corrected.load_state_dict(official.state_dict())
    by_config = corrected.rank_answers(**tiny_inputs, answer_input_ids=candidates, answer_attention_mask=mask, k=99)
    by_argument = official.rank_answers(
        **tiny_inputs, answer_input_ids=candidates, answer_attention_mask=mask, k=99, official_answer_scoring=False
    )
    default = official.rank_answers(**tiny_inputs, answer_input_ids=candidates, answer_attention_mask=mask, k=99)
    assert by_config.candidate_indices.shape == (2, 6)  # k capped at the number of candidates
    assert torch.allclose(by_config.scores, by_argument.scores)
    # The official score adds log p(first token) once more.
    first = official.first_token_probabilities(
        official(**tiny_inputs).question_states, tiny_inputs["attention_mask"], candidates
    )
    order = default.candidate_indices
    expected = by_argument.scores.gather(1, by_argument.candidate_indices.argsort(1)).gather(1, order)
    assert torch.allclose(default.scores, expected + first.gather(1, order).log(), atol=1e-5)


def test_ranking_is_per_question_and_candidates_outside_the_first_stage_never_win(model, tiny_inputs):
    candidates = _candidates()
    mask = (candidates != PAD).long()
    both = model.rank_answers(**tiny_inputs, answer_input_ids=candidates, answer_attention_mask=mask, k=3)
    for b in range(2):
        one = {k: v[b : b + 1] for k, v in tiny_inputs.items()}
        alone = model.rank_answers(**one, answer_input_ids=candidates, answer_attention_mask=mask, k=3)
        assert torch.equal(alone.candidate_indices[0], both.candidate_indices[b])
        assert torch.allclose(alone.probabilities[0], both.probabilities[b], atol=1e-5)
    first = model.first_token_probabilities(model(**tiny_inputs).question_states, tiny_inputs["attention_mask"], candidates)
    allowed = first.topk(3, dim=1).indices
    for b in range(2):
        assert set(both.candidate_indices[b].tolist()) == set(allowed[b].tolist())


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("lengths", [(1, 2, 3), (1,)])
def test_ranking_from_the_first_step_cache_equals_the_official_order(model, tiny_inputs, with_mask, lengths):
    """`reuse_first_step` (cache of the [CLS] step, padding columns trimmed) against the official order (question
    states tiled k times, every candidate decoded from [CLS]): same candidates, same scores."""
    generator = torch.Generator().manual_seed(5)
    rows = [torch.randint(5, 60, (lengths[i % len(lengths)],), generator=generator).tolist() for i in range(10)]
    candidates = _answers(rows)
    mask = (candidates != PAD).long() if with_mask else None
    for k in (1, 4, 10):
        fast = model.rank_answers(**tiny_inputs, answer_input_ids=candidates, answer_attention_mask=mask, k=k)
        slow = model.rank_answers(
            **tiny_inputs, answer_input_ids=candidates, answer_attention_mask=mask, k=k, reuse_first_step=False
        )
        assert torch.equal(fast.candidate_indices, slow.candidate_indices)
        assert torch.allclose(fast.scores, slow.scores, atol=1e-5)
        assert torch.allclose(fast.probabilities, slow.probabilities, atol=1e-5)


def test_rank_answers_rejects_bad_candidates(model, tiny_inputs):
    with pytest.raises(ValueError, match="encode_answers"):
        model.rank_answers(**tiny_inputs, answer_input_ids=torch.tensor([CLS, 7, SEP]))
    bad_start = _candidates(4)
    bad_start[1, 0] = 9
    with pytest.raises(ValueError, match="same token"):
        model.rank_answers(**tiny_inputs, answer_input_ids=bad_start)


def test_generate_greedy_is_the_step_by_step_argmax_and_beams_run(model, tiny_inputs):
    generated = model.generate(**tiny_inputs, max_new_tokens=4)
    assert generated.shape[0] == 2 and bool((generated[:, 0] == CLS).all())
    states = model(**tiny_inputs).question_states
    for b in range(2):
        ids = torch.tensor([[CLS]])
        for _ in range(generated.shape[1] - 1):
            logits = model.text_decoder(
                input_ids=ids, encoder_hidden_states=states[b : b + 1],
                encoder_attention_mask=tiny_inputs["attention_mask"][b : b + 1], use_cache=False,
            ).logits[0, -1]
            token = int(logits.argmax())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == SEP:
                break
        assert torch.equal(generated[b, : ids.shape[1]], ids[0])
    beams = model.generate(**tiny_inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 4 and bool((beams[:, 0] == CLS).all())


def test_generate_needs_the_start_and_end_tokens(tiny_inputs):
    model = XVLMForQuestionAnswering(XVLMConfig.from_preset("tiny")).eval()
    with pytest.raises(ValueError, match="bos_token_id"):
        model.generate(**tiny_inputs)


def test_save_and_load_keep_outputs_and_the_tied_decoder(model, tiny_inputs, tmp_path):
    from safetensors import safe_open

    labels = _answers([[7, 8], [9]])
    model.save_pretrained(tmp_path)
    loaded = XVLMForQuestionAnswering.from_pretrained(tmp_path).eval()
    decoder = loaded.text_decoder
    assert decoder.lm_head.decoder.weight is decoder.text_model.embeddings.word_embeddings.weight
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "text_decoder.lm_head.decoder.weight" not in keys  # the tie is stored once
    assert "text_decoder.text_model.embeddings.word_embeddings.weight" in keys
    a, b = model(**tiny_inputs, labels=labels), loaded(**tiny_inputs, labels=labels)
    assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.allclose(a.loss, b.loss, atol=1e-6)


def test_a_few_steps_fit_the_answers(tiny_inputs):
    torch.manual_seed(0)
    model = XVLMForQuestionAnswering(_config()).train()
    labels = _answers([[7, 8], [9]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(**tiny_inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    # The fitted answers are what generation now produces.
    generated = model.eval().generate(**tiny_inputs, max_new_tokens=4)
    assert generated[0, : labels.shape[1]].tolist()[:4] == labels[0, :4].tolist()
    assert F.pad(generated[1], (0, 8))[:3].tolist() == labels[1, :3].tolist()


def _left_padded(inputs: dict) -> dict:
    """`tiny_inputs` with the padded second question moved to the left (as transformers' pipeline pads)."""
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    ids[1], mask[1] = ids[1].roll(2), mask[1].roll(2)
    assert mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1]
    return {**inputs, "input_ids": ids, "attention_mask": mask}


def test_generate_and_ranking_read_left_padded_questions_as_right_padded(model, tiny_inputs):
    left = _left_padded(tiny_inputs)
    assert torch.equal(model.generate(**left, max_new_tokens=4), model.generate(**tiny_inputs, max_new_tokens=4))
    ranked = model.rank_answers(**left, answer_input_ids=_candidates(), k=5)
    expected = model.rank_answers(**tiny_inputs, answer_input_ids=_candidates(), k=5)
    assert torch.equal(ranked.candidate_indices, expected.candidate_indices)
    assert torch.allclose(ranked.scores, expected.scores, atol=1e-6)
    with pytest.raises(ValueError, match="left-padded.*padding_side = 'right'"):
        model(**left)  # forward returns per-position question states: the layout is the caller's
