"""Retrieval metrics (official itm_eval) and the ranking API (ITC top-k + ITM re-ranking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_xvlm import XVLMConfig, XVLMForRetrieval
from modeling_xvlm.retrieval import (
    encode_images,
    encode_texts,
    rank_gallery,
    retrieval_metrics,
    score_matrices,
)


def _official_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """The official loop (Retrieval.py::itm_eval), written out from the digest, as the reference."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
        ranks[index] = rank
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return tr, ir


def test_metrics_on_hand_made_matrices():
    # 2 images, 4 texts; image 0 owns texts 0, 1 and image 1 owns texts 2, 3.
    img2txt = [[0, 1], [2, 3]]
    txt2img = [0, 0, 1, 1]
    # Image 0 ranks text 1 first (a GT text) -> rank 0; image 1 ranks 0, 1, 3, 2 -> best GT text (3) at rank 2.
    scores_i2t = np.array([[0.2, 0.9, 0.1, 0.0], [0.9, 0.8, 0.1, 0.7]], dtype=np.float32)
    # Texts 0, 2 rank their image first; texts 1, 3 rank it second.
    scores_t2i = np.array([[0.9, 0.1], [0.2, 0.3], [0.1, 0.5], [0.8, 0.4]], dtype=np.float32)
    m = retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    assert m["txt_r1"] == 50.0 and m["txt_r5"] == 100.0 and m["txt_r10"] == 100.0
    assert m["img_r1"] == 50.0 and m["img_r5"] == 100.0 and m["img_r10"] == 100.0
    assert m["txt_r_mean"] == pytest.approx(250 / 3) and m["img_r_mean"] == pytest.approx(250 / 3)
    assert m["r_mean"] == pytest.approx(250 / 3)
    assert list(m) == [
        "txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean",
    ]  # fmt: skip


def test_metrics_recall_at_5_and_10_boundaries():
    # 1 image, 12 texts; its GT text sits at rank 4 (R@5 hit, R@1 miss) -> txt 0/100/100.
    scores_i2t = np.arange(12, 0, -1, dtype=np.float32)[None]  # text j has rank j
    img2txt = [[4]]
    # 12 texts each against 1 image: rank always 0.
    m = retrieval_metrics(scores_i2t, scores_i2t.T.copy(), [0] * 12, img2txt)
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == (0.0, 100.0, 100.0)
    m = retrieval_metrics(scores_i2t, scores_i2t.T.copy(), [0] * 12, [[7]])
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == (0.0, 0.0, 100.0)
    m = retrieval_metrics(scores_i2t, scores_i2t.T.copy(), [0] * 12, [[11]])
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == (0.0, 0.0, 0.0)
    assert m["img_r1"] == 100.0


def test_metrics_equal_official_loop_with_ties():
    rng = np.random.default_rng(0)
    n_img, per = 15, 3
    n_txt = n_img * per
    txt2img = np.repeat(np.arange(n_img), per)
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    for _ in range(5):
        # -100 fill and coarse values give many ties, as the official top-k matrices do.
        s_i2t = np.full((n_img, n_txt), -100.0, dtype=np.float32)
        s_t2i = np.full((n_txt, n_img), -100.0, dtype=np.float32)
        mask = rng.random(s_i2t.shape) < 0.3
        s_i2t[mask] = rng.integers(0, 4, mask.sum())
        mask = rng.random(s_t2i.shape) < 0.3
        s_t2i[mask] = rng.integers(0, 4, mask.sum())
        ours = retrieval_metrics(torch.from_numpy(s_i2t), torch.from_numpy(s_t2i), txt2img, img2txt)
        tr, ir = _official_itm_eval(s_i2t, s_t2i, txt2img, img2txt)
        assert [ours["txt_r1"], ours["txt_r5"], ours["txt_r10"]] == tr
        assert [ours["img_r1"], ours["img_r5"], ours["img_r10"]] == ir


# -- ranking --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gallery():
    torch.manual_seed(0)
    model = XVLMForRetrieval(XVLMConfig.from_preset("tiny")).eval()
    pixel_values = torch.randn(4, 3, 64, 64)
    input_ids = torch.randint(5, 128, (6, 7))
    input_ids[:, 0] = 2
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    attention_mask[4, 5:] = 0
    return model, pixel_values, input_ids, attention_mask


def test_rank_equals_brute_force(gallery):
    model, pixel_values, input_ids, attention_mask = gallery
    n_img, n_txt, k = 4, 6, 3
    with torch.no_grad():
        brute = torch.empty(n_img, n_txt)
        for i in range(n_img):
            for t in range(n_txt):
                brute[i, t] = model.itm_scores(
                    pixel_values=pixel_values[i : i + 1],
                    input_ids=input_ids[t : t + 1],
                    attention_mask=attention_mask[t : t + 1],
                )[0]
        image_feat = model.xvlm.get_image_features(pixel_values).pooler_output
        text_feat = model.xvlm.get_text_features(input_ids, attention_mask).pooler_output
        sims = image_feat @ text_feat.t()
    out = model.rank(pixel_values, input_ids, attention_mask, k=k, batch_size=2)
    assert torch.allclose(out.similarity, sims, atol=1e-6)
    assert out.i2t_indices.shape == (n_img, k) and out.t2i_indices.shape == (n_txt, k)
    for i in range(n_img):
        assert set(out.i2t_indices[i].tolist()) == set(sims[i].topk(k).indices.tolist())
        assert torch.allclose(out.i2t_scores[i], brute[i, out.i2t_indices[i]], atol=1e-5)
        assert (out.i2t_scores[i][:-1] >= out.i2t_scores[i][1:]).all()
    for t in range(n_txt):
        assert set(out.t2i_indices[t].tolist()) == set(sims[:, t].topk(k).indices.tolist())
        assert torch.allclose(out.t2i_scores[t], brute[out.t2i_indices[t], t], atol=1e-5)
        assert (out.t2i_scores[t][:-1] >= out.t2i_scores[t][1:]).all()
    # Each candidate pair scored exactly once even when it is a candidate in both directions.
    pairs = {(i, t) for i in range(n_img) for t in out.i2t_indices[i].tolist()}
    pairs |= {(i, t) for t in range(n_txt) for i in out.t2i_indices[t].tolist()}
    assert out.num_pairs_scored == len(pairs) < n_img * k + n_txt * k


def test_rank_encodes_each_input_once_and_batches_fusion(gallery, monkeypatch):
    model, pixel_values, input_ids, attention_mask = gallery
    calls = {"image_rows": 0, "text_rows": 0, "fuse_calls": 0, "fused_rows": 0}
    encode_image, text_forward, fuse = model.xvlm.encode_image, model.xvlm.text_model.forward, model.xvlm.fuse

    def count_image(pixel_values, *args, **kwargs):
        calls["image_rows"] += pixel_values.shape[0]
        return encode_image(pixel_values, *args, **kwargs)

    def count_text(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls["text_rows"] += ids.shape[0]
        return text_forward(*args, **kwargs)

    def count_fuse(text_embeds, *args, **kwargs):
        calls["fuse_calls"] += 1
        calls["fused_rows"] += text_embeds.shape[0]
        return fuse(text_embeds, *args, **kwargs)

    monkeypatch.setattr(model.xvlm, "encode_image", count_image)
    monkeypatch.setattr(model.xvlm.text_model, "forward", count_text)
    monkeypatch.setattr(model.xvlm, "fuse", count_fuse)
    out = model.rank(pixel_values, input_ids, attention_mask, k=2, batch_size=4)
    assert calls["image_rows"] == 4 and calls["text_rows"] == 6
    assert calls["fused_rows"] == out.num_pairs_scored
    assert calls["fuse_calls"] == -(-out.num_pairs_scored // 4)


def test_score_matrices_official_layout(gallery):
    model, pixel_values, input_ids, attention_mask = gallery
    out = model.rank(pixel_values, input_ids, attention_mask, k=2)
    s_i2t, s_t2i = score_matrices(out)
    assert s_i2t.shape == (4, 6) and s_t2i.shape == (6, 4)
    assert ((s_i2t != -100).sum(1) == 2).all() and ((s_t2i != -100).sum(1) == 2).all()
    for i in range(4):
        assert torch.equal(s_i2t[i, out.i2t_indices[i]], out.i2t_scores[i])
    m_i2t, m_t2i = model.retrieval_score_matrices(pixel_values, input_ids, attention_mask, k=2)
    assert torch.allclose(m_i2t, s_i2t) and torch.allclose(m_t2i, s_t2i)
    metrics = retrieval_metrics(s_i2t, s_t2i, [0, 0, 1, 1, 2, 3], [[0, 1], [2, 3], [4], [5]])
    assert 0.0 <= metrics["r_mean"] <= 100.0


def test_k_larger_than_gallery_is_clamped(gallery):
    model, pixel_values, input_ids, attention_mask = gallery
    images = encode_images(model, pixel_values[:2])
    texts = encode_texts(model, input_ids, attention_mask)
    out = rank_gallery(model, images, texts, k=16)
    assert out.i2t_indices.shape == (2, 6) and out.t2i_indices.shape == (6, 2)
    assert out.num_pairs_scored == 12
