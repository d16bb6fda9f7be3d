"""Caption metrics: the COCO caption evaluation and the CIDEr-D reward of self-critical training (SCST).

**COCO evaluation** (official ``Captioning.py``: ``dataset/utils.py::coco_caption_eval``, i.e. pycocoevalcap's
``COCOEvalCap`` against ``coco_karpathy_test_gt.json``)::

    caption_metrics(predictions, references, metrics=("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"), tokenizer="ptb")
    -> {"BLEU-4": float, "METEOR": float, "ROUGE-L": float, "CIDEr": float}

``predictions`` maps an image id to its generated caption, ``references`` the same ids to their reference captions
(every id in both, as ``COCOEvalCap`` scores every ground-truth image). The texts are tokenised like ``COCOEvalCap``
(Stanford PTB tokenizer, lower case, punctuation tokens removed; gold and generated captions separately) and scored
by pycocoevalcap's own scorers: ``Bleu(4)`` (``BLEU-1`` .. ``BLEU-4``, option ``closest``), ``Meteor`` (METEOR 1.5),
``Rouge`` (``ROUGE-L``, beta 1.2) and ``Cider`` (``CIDEr``: CIDEr-D as coco-caption computes it, document
frequencies from the evaluated references). Values are fractions as pycocoevalcap returns them (CIDEr up to 10),
not percentages. SPICE is not offered (it downloads Stanford models at first use).

Java: the PTB tokenizer and METEOR run Java programs shipped with pycocoevalcap. Without ``java`` on ``PATH``,
:func:`caption_metrics` raises :class:`JavaNotFoundError` naming what needs it; ``tokenizer="simple"``
(:func:`simple_tokenize`, pure Python) with ``METEOR`` left out of ``metrics`` computes BLEU / ROUGE-L / CIDEr
without Java (close to, not identical with, the PTB numbers: see :func:`simple_tokenize`).

The official result file is ``[{"image_id": <COCO image id, int>, "caption": str}, ...]``
(:func:`caption_result_records`); the COCO id of a ``retrieval`` row comes from
``modeling_xvlm.data.coco_image_id(row["image_id"])`` and the official references from
``modeling_xvlm.data.load_coco_caption_references("coco_karpathy_test_gt.json")``.

**SCST reward** (official ``Captioning_scst.py``, ``utils.ScstRewardCriterion`` and
``utils/cider/pyciderevalcap/ciderD``): CIDEr-D with document frequencies of the *training* corpus (the cached
``coco-train-words.p``, :func:`load_official_document_frequencies`), every sentence passed through
:func:`scst_sentence` (a trailing ``"."`` stripped, ``" <eos>"`` appended)::

    cider = CiderD(load_official_document_frequencies("coco-train-words.p"))   # or CiderD(train_reference_lists)
    rewards = cider.scst_scores(sampled_captions, reference_lists)            # (N,) float64

This module imports only numpy at import time; pycocoevalcap is imported when :func:`caption_metrics` runs.
"""

from __future__ import annotations

import math
import pickle
import re
import shutil
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CAPTION_METRICS",
    "DEFAULT_CAPTION_METRICS",
    "TOKENIZERS",
    "JavaNotFoundError",
    "caption_metrics",
    "simple_tokenize",
    "caption_result_records",
    "DocumentFrequencies",
    "document_frequencies",
    "load_official_document_frequencies",
    "CiderD",
    "scst_sentence",
]

#: Every metric :func:`caption_metrics` computes (pycocoevalcap names: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr).
CAPTION_METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
#: The metrics reported by default (the ones of the X-VLM paper's captioning table).
DEFAULT_CAPTION_METRICS: tuple[str, ...] = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
TOKENIZERS: tuple[str, ...] = ("ptb", "simple")
_JAVA_METRICS = ("METEOR",)


class JavaNotFoundError(RuntimeError):
    """``java`` is not on ``PATH`` but the PTB tokenizer or METEOR was asked for."""


# --------------------------------------------------------------------------------------------------------------------
# COCO caption evaluation
# --------------------------------------------------------------------------------------------------------------------


def simple_tokenize(text: str) -> str:
    """A pure-Python stand-in for the PTB tokenizer: lower case, every character that is not a letter, a digit or
    whitespace replaced by a space, words re-joined by single spaces.

    It equals pycocoevalcap's PTB tokenisation (``-lowerCase``, punctuation tokens dropped) on words separated by
    spaces and the punctuation ``. , ? ! : ; - ( ) ' "``; it differs on possessives and contractions (PTB:
    ``"dog's"`` -> ``"dog 's"``, ``"don't"`` -> ``"do n't"``; here ``"dog s"``, ``"don t"``) and hyphenated words
    (PTB keeps ``"t-shirt"``; here ``"t shirt"``).
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a caption string, got {type(text).__name__}: {text!r}")
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = tuple(metrics)
    unknown = [m for m in names if m not in CAPTION_METRICS]
    if unknown or not names:
        raise ValueError(f"unknown caption metric(s) {unknown}; expected some of {list(CAPTION_METRICS)}")
    return names


def _check_inputs(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> list[Hashable]:
    """The image ids to score (in ``references`` order); errors name the first offending ids."""
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError("predictions and references must be mappings {image_id: caption} / {image_id: [captions]}")
    if not references:
        raise ValueError("no references to score against")
    missing = [i for i in references if i not in predictions]
    extra = [i for i in predictions if i not in references]
    if missing or extra:
        raise ValueError(
            "predictions and references must have the same image ids (as COCOEvalCap scores every ground-truth "
            f"image): {len(missing)} without a prediction (e.g. {missing[:5]}), {len(extra)} without references "
            f"(e.g. {extra[:5]})"
        )
    for image_id in references:
        caption, refs = predictions[image_id], references[image_id]
        if not isinstance(caption, str):
            raise TypeError(f"predictions[{image_id!r}] must be a string, got {type(caption).__name__}")
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{image_id!r}] must be a list of strings, got {refs!r}")
        if not refs:
            raise ValueError(f"references[{image_id!r}] is empty: every image needs at least one reference")
    return list(references)


def _require_java(metrics: Sequence[str], tokenizer: str) -> None:
    needs = (["the PTB tokenizer (tokenizer='ptb')"] if tokenizer == "ptb" else []) + [
        m for m in metrics if m in _JAVA_METRICS
    ]
    if needs and shutil.which("java") is None:
        raise JavaNotFoundError(
            f"caption_metrics needs Java (a `java` executable on PATH) for {' and '.join(needs)}: pycocoevalcap "
            "runs the Stanford PTB tokenizer and METEOR 1.5 as Java programs. Install a Java runtime (e.g. "
            "`apt-get install default-jre-headless`), or compute BLEU / ROUGE-L / CIDEr without Java with "
            "tokenizer='simple' and METEOR left out of `metrics`."
        )


def _pycocoevalcap() -> Any:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:  # pragma: no cover - it is an install requirement
        raise ImportError("caption_metrics needs pycocoevalcap: `pip install 'pycocoevalcap>=1.2'`") from error
    return Bleu, Meteor, Rouge, Cider, PTBTokenizer


def _tokenize(captions: Mapping[Hashable, Sequence[str]], tokenizer: str) -> dict[Hashable, list[str]]:
    if tokenizer == "simple":
        return {i: [simple_tokenize(c) for c in caps] for i, caps in captions.items()}
    ptb = _pycocoevalcap()[4]()
    return ptb.tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_CAPTION_METRICS,
    tokenizer: str = "ptb",
) -> dict[str, float]:
    """COCO caption metrics of ``predictions`` against ``references`` (pycocoevalcap, as ``COCOEvalCap``).

    Args:
        predictions: ``{image_id: generated caption}``.
        references: ``{image_id: [reference captions]}``, the same ids (at least one reference each).
        metrics: any of :data:`CAPTION_METRICS` (``BLEU-1`` .. ``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr``).
        tokenizer: ``"ptb"`` (pycocoevalcap's Stanford PTB tokenizer, needs Java; the official evaluation) or
            ``"simple"`` (:func:`simple_tokenize`, pure Python).

    Returns:
        ``{metric: value}`` in the order of ``metrics``; corpus-level values as pycocoevalcap computes them
        (BLEU over the whole corpus, METEOR from the aggregated statistics, ROUGE-L and CIDEr averaged over images).

    Raises:
        JavaNotFoundError: Java is needed (``tokenizer="ptb"`` or ``METEOR``) and ``java`` is not on ``PATH``.
        ValueError / TypeError: unknown metric or tokenizer, ids that differ, non-string captions, no references.
    """
    names = _check_metrics(metrics)
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {list(TOKENIZERS)}")
    ids = _check_inputs(predictions, references)
    _require_java(names, tokenizer)
    Bleu, Meteor, Rouge, Cider, _ = _pycocoevalcap()
    gts = _tokenize({i: list(references[i]) for i in ids}, tokenizer)
    res = _tokenize({i: [predictions[i]] for i in ids}, tokenizer)
    values: dict[str, float] = {}
    if any(m.startswith("BLEU-") for m in names):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        values.update({f"BLEU-{k + 1}": float(v) for k, v in enumerate(bleu)})
    for name, scorer in (("METEOR", Meteor), ("ROUGE-L", Rouge), ("CIDEr", Cider)):
        if name in names:
            values[name] = float(scorer().compute_score(gts, res)[0])
    return {m: values[m] for m in names}


def caption_result_records(predictions: Mapping[Hashable, str], *, coco_ids: bool = False) -> list[dict[str, Any]]:
    """The official result-file rows ``[{"image_id", "caption"}]`` (``Captioning.py::evaluation``), in mapping order.

    With ``coco_ids=True`` every key is turned into the numeric COCO image id with
    :func:`modeling_xvlm.data.coco_image_id` (``"val2014/COCO_val2014_000000391895.jpg"`` -> ``391895``), as the
    official file holds; otherwise the keys are written as they are. ``json.dump`` the list to get the file.
    """
    if coco_ids:
        from .data.official import coco_image_id

        return [{"image_id": coco_image_id(k), "caption": str(v)} for k, v in predictions.items()]
    return [{"image_id": k, "caption": str(v)} for k, v in predictions.items()]


# --------------------------------------------------------------------------------------------------------------------
# CIDEr-D with corpus document frequencies (the SCST reward)
# --------------------------------------------------------------------------------------------------------------------

NGram = tuple[str, ...]


@dataclass(frozen=True)
class DocumentFrequencies:
    """CIDEr document frequencies: ``counts[ngram]`` = the number of documents (images: each image's reference
    captions together form one document) that contain ``ngram``; ``num_documents`` = the number of documents."""

    counts: Mapping[NGram, float]
    num_documents: int


def _ngrams(sentence: str, n: int) -> Counter:
    """The 1..n-gram counts of a whitespace-split sentence."""
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check_reference_lists(corpus: Any, what: str) -> list[list[str]]:
    if isinstance(corpus, str) or not isinstance(corpus, Sequence):
        raise TypeError(f"{what} must be a list of reference lists (one list of strings per image)")
    out = []
    for k, refs in enumerate(corpus):
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"{what}[{k}] must be a list of strings, got {refs!r}")
        if not refs:
            raise ValueError(f"{what}[{k}] is empty: every image needs at least one reference")
        out.append(list(refs))
    return out


def document_frequencies(corpus: Sequence[Sequence[str]], n: int = 4) -> DocumentFrequencies:
    """Document frequencies of a reference corpus: one document per image (its list of reference sentences).

    This is how the official ``coco-train-words.p`` was made from the training captions (each sentence there ends
    with ``<eos>``: pass ``[[scst_sentence(c) for c in refs] for refs in corpus]`` to match it).
    """
    corpus = _check_reference_lists(corpus, "reference_corpus")
    if not corpus:
        raise ValueError("the reference corpus is empty")
    counts: Counter = Counter()
    for refs in corpus:
        counts.update(set().union(*(_ngrams(r, n) for r in refs)))
    return DocumentFrequencies(dict(counts), len(corpus))


class _DocumentFrequencyUnpickler(pickle.Unpickler):
    """Allows only what the official cache holds: dicts, tuples, strings, numbers and ``defaultdict(float)``."""

    _ALLOWED = frozenset({("collections", "defaultdict"), ("builtins", "float"), ("__builtin__", "float"),
                          ("builtins", "int"), ("__builtin__", "int")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIDEr document-frequency pickle: only dicts, tuples, "
                "strings, numbers and defaultdict(float) are allowed"
            )
        return super().find_class(module, name)


def load_official_document_frequencies(path: str | Path) -> DocumentFrequencies:
    """Read the official cached CIDEr-D document frequencies (``coco-train-words.p``, ``cider_cached_tokens`` of
    ``configs/Captioning_scst.yaml``): a (Python 2) pickle ``{"document_frequency": {ngram tuple: count},
    "ref_len": number of images}``.

    The pickle is read with an unpickler that refuses every class and function except ``defaultdict`` / ``float``
    / ``int``, so a tampered file raises instead of running code.
    """
    with open(path, "rb") as f:
        payload = _DocumentFrequencyUnpickler(f, encoding="latin1").load()
    if not isinstance(payload, Mapping) or not {"document_frequency", "ref_len"} <= set(payload):
        raise ValueError(f"{path}: expected a dict with 'document_frequency' and 'ref_len' (coco-train-words.p)")
    counts = payload["document_frequency"]
    if not isinstance(counts, Mapping) or not all(
        isinstance(g, tuple) and all(isinstance(w, str) for w in g) for g in counts
    ):
        raise ValueError(f"{path}: 'document_frequency' must map n-gram tuples of words to counts")
    return DocumentFrequencies({g: float(c) for g, c in counts.items()}, int(payload["ref_len"]))


def scst_sentence(text: str) -> str:
    """A sentence as the official SCST reward sees it (``ScstRewardCriterion._wrap_sentence``): stripped, one
    trailing ``"."`` removed, ``" <eos>"`` appended (the cached document frequencies count ``<eos>`` n-grams)."""
    return text.strip().removesuffix(".") + " <eos>"


class CiderD:
    """CIDEr-D of candidates against their references with fixed corpus document frequencies (official
    ``utils/cider/pyciderevalcap/ciderD``, the SCST reward).

    For a candidate ``c`` with references ``r_1..r_R``::

        g_k(s)[w]   = tf_s(w) * (log(num_documents) - log(max(1, df(w))))        for the k-grams w of s
        sim_k(c, r) = sum_w min(g_k(c)[w], g_k(r)[w]) * g_k(r)[w] / (|g_k(c)| |g_k(r)|)   (0 if a norm is 0)
                      * exp(-(len(c) - len(r))^2 / (2 sigma^2))
        CIDEr-D(c)  = 10 * mean_{k=1..n} (sum_j sim_k(c, r_j)) / R

    ``len(s)`` is counted as coco-caption does, as the number of bigrams of ``s``; for non-empty sentences the
    difference ``len(c) - len(r)`` equals the difference of their word counts.

    pycocoevalcap's ``CiderScorer`` computes the same formula, but its ``compute_score`` always recounts the
    document frequencies from the references being scored and sets ``log(num_documents)`` to the log of their
    number inside ``compute_cider``; the training-corpus frequencies of SCST cannot be given to it without
    overriding those internals, so the formula is written out here (``tests/test_caption_metrics.py`` checks it
    against pycocoevalcap's ``Cider`` when the corpus is the scored references).

    Args:
        reference_corpus: the corpus whose document frequencies weight the n-grams: a list of reference lists (one
            per image, see :func:`document_frequencies`) or :class:`DocumentFrequencies` (e.g.
            :func:`load_official_document_frequencies`).
        n: the largest n-gram order (4). sigma: the standard deviation of the length penalty (6.0).
    """

    def __init__(
        self, reference_corpus: Sequence[Sequence[str]] | DocumentFrequencies, n: int = 4, sigma: float = 6.0
    ) -> None:
        if not isinstance(n, int) or n < 1 or not sigma > 0:
            raise ValueError(f"n must be a positive integer and sigma positive, got n={n!r}, sigma={sigma!r}")
        if not isinstance(reference_corpus, DocumentFrequencies):
            reference_corpus = document_frequencies(reference_corpus, n)
        if reference_corpus.num_documents < 1:
            raise ValueError("the document frequencies must come from at least one document")
        self.n, self.sigma = n, float(sigma)
        self.document_frequency = reference_corpus.counts
        self.log_num_documents = math.log(float(reference_corpus.num_documents))

    def _vectors(self, sentence: str) -> tuple[list[dict[NGram, float]], list[float], int]:
        """Per order k: the tf-idf vector and its norm; and the sentence length (its number of bigrams)."""
        vectors: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        squares = [0.0] * self.n
        length = 0
        for gram, tf in _ngrams(sentence, self.n).items():
            k = len(gram) - 1
            weight = float(tf) * (self.log_num_documents - math.log(max(1.0, self.document_frequency.get(gram, 0.0))))
            vectors[k][gram] = weight
            squares[k] += weight ** 2
            if k == 1:  # coco-caption counts the length in bigrams
                length += tf
        return vectors, [math.sqrt(s) for s in squares], length

    def _similarity(self, candidate: tuple, reference: tuple) -> np.ndarray:
        (hyp, hyp_norm, hyp_len), (ref, ref_norm, ref_len) = candidate, reference
        penalty = math.e ** (-(float(hyp_len - ref_len) ** 2) / (2 * self.sigma ** 2))
        values = np.zeros(self.n)
        for k in range(self.n):
            values[k] = sum(min(w, ref[k].get(g, 0.0)) * ref[k].get(g, 0.0) for g, w in hyp[k].items())
            if hyp_norm[k] != 0 and ref_norm[k] != 0:
                values[k] /= hyp_norm[k] * ref_norm[k]
            values[k] *= penalty
        return values

    def scores(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of ``candidates[i]`` against ``references[i]`` (whitespace-tokenised as given): ``(N,)`` float64."""
        if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
            raise TypeError("candidates must be a list of strings")
        references = _check_reference_lists(references, "references")
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        out = np.zeros(len(candidates))
        for i, (candidate, refs) in enumerate(zip(candidates, references)):
            hyp = self._vectors(candidate)
            total = sum(self._similarity(hyp, self._vectors(r)) for r in refs)
            out[i] = np.mean(total) / len(refs) * 10.0
        return out

    def scst_scores(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """:meth:`scores` with every candidate and reference passed through :func:`scst_sentence` (official
        ``ScstRewardCriterion._calculate_eval_scores``): the per-sample SCST reward before the baseline."""
        references = _check_reference_lists(references, "references")
        if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
            raise TypeError("candidates must be a list of strings")
        return self.scores([scst_sentence(c) for c in candidates],
                           [[scst_sentence(r) for r in refs] for refs in references])
