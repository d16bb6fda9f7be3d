"""Caption metrics (pycocoevalcap, as the official Captioning.py evaluates) and the SCST CIDEr-D reward."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
from collections import defaultdict

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from modeling_xvlm.caption_metrics import (
    CAPTION_METRICS,
    CiderD,
    DocumentFrequencies,
    JavaNotFoundError,
    caption_metrics,
    caption_result_records,
    document_frequencies,
    load_official_document_frequencies,
    scst_sentence,
    simple_tokenize,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no `java` on PATH: pycocoevalcap's PTB tokenizer and METEOR are Java programs")

# A tiny hand-made corpus: four images with reference captions (raw: capitals and punctuation).
REFERENCES = {
    101: ["A dog is sleeping on a red couch.", "A brown dog sleeps on the couch."],
    102: ["Two cats are playing with a ball of yarn.", "Two kittens play with yarn!"],
    103: ["A man rides a bicycle down the street.", "A person riding a bike on a road."],
    104: ["A plate of food with broccoli and rice.", "Some rice and broccoli on a white plate."],
}
GOOD = {101: "A brown dog sleeps on the couch.", 102: "Two cats play with a ball of yarn.",
        103: "A man riding a bike down the street.", 104: "A plate of rice and broccoli."}
WRONG = {101: "A plate of food.", 102: "A man rides a horse.", 103: "Two dogs on a couch.", 104: "A cat sleeping."}
ONE_REF = {k: [v[0]] for k, v in REFERENCES.items()}
IDENTICAL = {k: v[0] for k, v in REFERENCES.items()}


def _direct(gts: dict, res: dict) -> dict[str, float]:
    """pycocoevalcap's scorer classes called directly on tokenised texts (the COCOEvalCap loop)."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
            "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}


# --------------------------------------------------------------------------------------------------------------------
# caption_metrics
# --------------------------------------------------------------------------------------------------------------------


def test_identical_captions_score_perfectly_and_wrong_ones_lower():
    metrics = ("BLEU-4", "ROUGE-L", "CIDEr")
    perfect = caption_metrics(IDENTICAL, ONE_REF, metrics=metrics, tokenizer="simple")
    assert list(perfect) == list(metrics)
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # pycocoevalcap's 1e-9 smoothing
    assert perfect["ROUGE-L"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["CIDEr"] == pytest.approx(10.0, abs=1e-9)  # one reference: cosine 1 for every order, x10
    good = caption_metrics(GOOD, REFERENCES, metrics=metrics, tokenizer="simple")
    wrong = caption_metrics(WRONG, REFERENCES, metrics=metrics, tokenizer="simple")
    for name in metrics:
        assert 0.0 <= wrong[name] < good[name], name
    assert wrong["BLEU-4"] < 1e-3 and wrong["CIDEr"] < 0.5 < good["CIDEr"]


def test_simple_tokenizer_values_equal_the_scorer_classes():
    gts = {k: [simple_tokenize(c) for c in v] for k, v in REFERENCES.items()}
    res = {k: [simple_tokenize(v)] for k, v in GOOD.items()}
    expected = _direct(gts, res)
    names = tuple(expected)
    assert caption_metrics(GOOD, REFERENCES, metrics=names, tokenizer="simple") == expected


@needs_java
def test_ptb_values_equal_the_scorer_classes_and_meteor_runs():
    ptb = PTBTokenizer()
    gts = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = ptb.tokenize({k: [{"caption": v}] for k, v in GOOD.items()})
    assert gts[101][0] == "a dog is sleeping on a red couch"  # lower case, "." removed
    got = caption_metrics(GOOD, REFERENCES, metrics=CAPTION_METRICS)
    expected = {**_direct(gts, res), "METEOR": Meteor().compute_score(gts, res)[0]}
    assert got == {name: expected[name] for name in CAPTION_METRICS}
    assert 0.0 < got["METEOR"] < 1.0
    default = caption_metrics(GOOD, REFERENCES)  # BLEU-4, METEOR, ROUGE-L, CIDEr
    assert list(default) == ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert default == {name: got[name] for name in default}
    perfect = caption_metrics(IDENTICAL, ONE_REF)
    assert perfect["METEOR"] == pytest.approx(1.0, abs=1e-9) and perfect["CIDEr"] == pytest.approx(10.0)
    wrong = caption_metrics(WRONG, REFERENCES)
    assert all(wrong[name] < default[name] for name in default)


@needs_java
def test_simple_tokenizer_matches_ptb_on_plain_captions_and_synthetic_ones():
    from modeling_xvlm.data.synthetic import SyntheticConfig, generate_split

    config = SyntheticConfig(num_train=2, num_validation=2, num_test=6)
    synthetic = [c for scene in generate_split(config, "test") for c in scene.captions]
    texts = synthetic + [c for v in REFERENCES.values() for c in v]
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [simple_tokenize(t) for t in texts] == [ptb[i][0] for i in range(len(texts))]
    # synthetic captions are already lower case without punctuation: both tokenizers leave them unchanged
    assert [simple_tokenize(t) for t in synthetic] == synthetic
    # the documented differences
    assert simple_tokenize("A dog's T-shirt") == "a dog s t shirt"
    assert PTBTokenizer().tokenize({0: [{"caption": "A dog's T-shirt"}]})[0] == ["a dog 's t-shirt"]


def test_missing_java_is_a_clear_error_and_simple_without_meteor_runs_without_java(monkeypatch):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k))

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    with pytest.raises(JavaNotFoundError, match=r"needs Java .* PTB tokenizer \(tokenizer='ptb'\) and METEOR"):
        caption_metrics(GOOD, REFERENCES)
    with pytest.raises(JavaNotFoundError, match=r"Java .* for METEOR: .*tokenizer='simple'"):
        caption_metrics(GOOD, REFERENCES, metrics=("METEOR",), tokenizer="simple")
    with pytest.raises(JavaNotFoundError, match=r"for the PTB tokenizer \(tokenizer='ptb'\): "):
        caption_metrics(GOOD, REFERENCES, metrics=("CIDEr",))
    values = caption_metrics(GOOD, REFERENCES, metrics=("BLEU-4", "ROUGE-L", "CIDEr"), tokenizer="simple")
    gts = {k: [simple_tokenize(c) for c in v] for k, v in REFERENCES.items()}
    res = {k: [simple_tokenize(v)] for k, v in GOOD.items()}
    expected = _direct(gts, res)
    assert values == {name: expected[name] for name in values}


def test_bad_inputs_are_clear_errors():
    simple = {"tokenizer": "simple", "metrics": ("CIDEr",)}
    with pytest.raises(ValueError, match=r"same image ids .* 1 without a prediction \(e.g. \[104\]\)"):
        caption_metrics({k: v for k, v in GOOD.items() if k != 104}, REFERENCES, **simple)
    with pytest.raises(ValueError, match=r"1 without references \(e.g. \[999\]\)"):
        caption_metrics({**GOOD, 999: "x"}, REFERENCES, **simple)
    with pytest.raises(ValueError, match="unknown caption metric.*'SPICE'"):
        caption_metrics(GOOD, REFERENCES, metrics=("CIDEr", "SPICE"), tokenizer="simple")
    with pytest.raises(ValueError, match="unknown tokenizer 'nltk'"):
        caption_metrics(GOOD, REFERENCES, metrics=("CIDEr",), tokenizer="nltk")
    with pytest.raises(TypeError, match=r"references\[101\] must be a list of strings"):
        caption_metrics(GOOD, {**REFERENCES, 101: "a dog"}, **simple)
    with pytest.raises(ValueError, match=r"references\[101\] is empty"):
        caption_metrics(GOOD, {**REFERENCES, 101: []}, **simple)
    with pytest.raises(TypeError, match=r"predictions\[101\] must be a string"):
        caption_metrics({**GOOD, 101: ["a dog"]}, REFERENCES, **simple)
    with pytest.raises(ValueError, match="no references"):
        caption_metrics({}, {}, **simple)


def test_result_records_follow_the_official_file():
    predictions = {"val2014/COCO_val2014_000000391895.jpg": "a man on a moped", "coco_522418": "a cake"}
    records = caption_result_records(predictions, coco_ids=True)
    assert records == [{"image_id": 391895, "caption": "a man on a moped"}, {"image_id": 522418, "caption": "a cake"}]
    assert json.loads(json.dumps(records)) == records
    assert caption_result_records({"test-000001": "x"}) == [{"image_id": "test-000001", "caption": "x"}]
    with pytest.raises(ValueError, match="no COCO image id in 'test-000001'"):
        caption_result_records({"test-000001": "x"}, coco_ids=True)


# --------------------------------------------------------------------------------------------------------------------
# CIDEr-D with corpus document frequencies (SCST)
# --------------------------------------------------------------------------------------------------------------------

CORPUS = [
    ["a dog on a couch <eos>", "a brown dog sleeping <eos>"],
    ["two cats on a bed <eos>", "cats sleeping on a bed <eos>"],
    ["a man riding a bike <eos>"],
]


def _grams(sentence: str, k: int) -> list[tuple[str, ...]]:
    words = sentence.split()
    return [tuple(words[i:i + k]) for i in range(len(words) - k + 1)]


def _hand_df(corpus):
    df = defaultdict(float)
    for refs in corpus:
        present = {g for r in refs for k in range(1, 5) for g in _grams(r, k)}
        for g in present:
            df[g] += 1
    return df


def _reference_cider_d(candidate, refs, df, num_docs, n=4, sigma=6.0):
    """CIDEr-D written out from the official ciderD_scorer formula with dense vectors over a joint vocabulary."""
    def bigrams(s):  # coco-caption's "length": the number of bigrams
        return len(_grams(s, 2))

    total = 0.0
    for k in range(1, n + 1):
        for ref in refs:
            vocab = sorted(set(_grams(candidate, k)) | set(_grams(ref, k)))
            idf = np.array([np.log(num_docs) - np.log(max(1.0, df.get(g, 0.0))) for g in vocab])
            h = np.array([_grams(candidate, k).count(g) for g in vocab], dtype=float) * idf
            r = np.array([_grams(ref, k).count(g) for g in vocab], dtype=float) * idf
            overlap = float(np.sum(np.minimum(h, r) * r * (h != 0)))  # clipped, over the candidate's n-grams
            norms = np.linalg.norm(h) * np.linalg.norm(r)
            cosine = overlap / norms if norms else overlap
            total += cosine * math.exp(-((bigrams(candidate) - bigrams(ref)) ** 2) / (2 * sigma ** 2))
    return 10.0 * total / n / len(refs)


def test_cider_d_equals_an_independent_computation_of_the_official_formula():
    df = _hand_df(CORPUS)
    freqs = document_frequencies(CORPUS)
    assert freqs.num_documents == 3
    assert freqs.counts[("a",)] == 3 and freqs.counts[("on", "a")] == 2 and freqs.counts[("<eos>",)] == 3
    assert freqs.counts == dict(df)
    candidates = ["a dog sleeping on a couch <eos>", "two cats sleeping on a bed <eos>", "a bike <eos>"]
    references = [CORPUS[0], CORPUS[1], ["a man riding a bike <eos>", "the man rides <eos>"]]
    got = CiderD(CORPUS).scores(candidates, references)
    expected = [_reference_cider_d(c, r, df, 3) for c, r in zip(candidates, references)]
    assert got.shape == (3,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert got[2] > 0  # "a bike <eos>" vs "a man riding a bike <eos>": length penalty, not zero
    # other n and sigma
    np.testing.assert_allclose(CiderD(CORPUS, n=2, sigma=2.0).scores(candidates, references),
                               [_reference_cider_d(c, r, df, 3, n=2, sigma=2.0) for c, r in
                                zip(candidates, references)], rtol=0, atol=1e-9)


def test_cider_d_by_hand_with_the_length_penalty():
    # "dog" has 0 bigrams and "dog runs fast" 2: the penalty uses delta = 2 (here equal to the word difference);
    # only the unigram order matches: cosine = log2^2 / (log2 * sqrt(3) log2) = 1/sqrt(3).
    corpus = [["dog runs fast"], ["cat"]]
    scorer = CiderD(corpus)
    unigram = scorer.scores(["dog"], [["dog runs fast"]])[0]
    df = _hand_df(corpus)
    assert unigram == pytest.approx(_reference_cider_d("dog", ["dog runs fast"], df, 2), abs=1e-12)
    assert unigram == pytest.approx(10 / 4 * (1 / math.sqrt(3)) * math.exp(-4 / 72), abs=1e-12)


def test_cider_d_with_the_scored_references_as_corpus_equals_pycocoevalcap_cider():
    ptb_free = {k: [simple_tokenize(c) for c in v] for k, v in REFERENCES.items()}
    res = {k: [simple_tokenize(v)] for k, v in GOOD.items()}
    _, per_image = Cider().compute_score(ptb_free, res)
    ours = CiderD(list(ptb_free.values())).scores([res[k][0] for k in ptb_free], list(ptb_free.values()))
    np.testing.assert_allclose(ours, per_image, rtol=0, atol=1e-12)


def test_scst_reward_prefers_the_reference_and_wraps_sentences_like_the_official_criterion():
    assert scst_sentence("  a dog on a couch. ") == "a dog on a couch <eos>"
    assert scst_sentence("a dog.. ") == "a dog. <eos>"  # only one trailing "." is stripped
    train = [["a dog on a couch", "a brown dog sleeping"], ["two cats on a bed"], ["a man riding a bike"]]
    scorer = CiderD([[scst_sentence(c) for c in refs] for refs in train])
    references = [["a dog on a couch."], ["a dog on a couch."]]
    rewards = scorer.scst_scores(["a dog on a couch", "two cats riding a bed"], references)
    assert rewards[0] > rewards[1] >= 0.0
    np.testing.assert_array_equal(
        rewards, scorer.scores(["a dog on a couch <eos>", "two cats riding a bed <eos>"],
                               [["a dog on a couch <eos>"]] * 2))


def test_official_document_frequency_pickle_is_read_and_code_is_refused(tmp_path):
    freqs = document_frequencies(CORPUS)
    official = {"document_frequency": defaultdict(float, freqs.counts), "ref_len": 3}
    path = tmp_path / "coco-train-words.p"
    path.write_bytes(pickle.dumps(official, protocol=2))
    loaded = load_official_document_frequencies(path)
    assert isinstance(loaded, DocumentFrequencies) and loaded.num_documents == 3 and loaded.counts == freqs.counts
    candidates, references = ["a dog on a bed <eos>"], [CORPUS[0]]
    np.testing.assert_array_equal(CiderD(loaded).scores(candidates, references),
                                  CiderD(CORPUS).scores(candidates, references))

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "bad.p"
    bad.write_bytes(pickle.dumps({"document_frequency": Exploit(), "ref_len": 1}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_official_document_frequencies(bad)
    assert not marker.exists()
    wrong = tmp_path / "wrong.p"
    wrong.write_bytes(pickle.dumps({"df": {}}, protocol=2))
    with pytest.raises(ValueError, match="'document_frequency' and 'ref_len'"):
        load_official_document_frequencies(wrong)


def test_cider_d_bad_inputs():
    scorer = CiderD(CORPUS)
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        scorer.scores(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match=r"references\[0\] must be a list of strings"):
        scorer.scores(["a"], ["a dog"])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        scorer.scores(["a"], [[]])
    with pytest.raises(TypeError, match="candidates must be a list of strings"):
        scorer.scores("a dog", [["a dog"]])
    with pytest.raises(ValueError, match="reference corpus is empty"):
        CiderD([])
    with pytest.raises(ValueError, match="n must be a positive integer"):
        CiderD(CORPUS, n=0)
