"""Text cleaning as in the official X-VLM ``dataset/utils.py``."""

from __future__ import annotations

import re

__all__ = ["pre_caption", "pre_question"]

# Characters the official code deletes (not replaces with a space): , . ' ! ? " ( ) * # : ; ~
_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_MULTI_SPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int | None = 30) -> str:
    """Clean a caption like the official ``pre_caption``.

    Steps: lower-case; delete ``, . ' ! ? " ( ) * # : ; ~``; replace ``-`` and ``/`` with a space and ``<person>``
    with ``person``; collapse runs of 2+ whitespace characters into one space; ``rstrip('\\n')`` then
    ``strip(' ')``; keep the first ``max_words`` space-separated words (``None``: no limit).

    Raises:
        ValueError: if the cleaned caption is empty (the official code raises as well), or ``caption`` is not a str.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}: {caption!r}")
    text = _DELETED.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _MULTI_SPACE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if max_words is not None and len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise ValueError(f"pre_caption produced an empty text from {caption!r}")
    return text


def pre_question(question: str, max_words: int | None = 30) -> str:
    """Clean a VQA question like the official ``pre_question``.

    Same deletions and ``-``/``/`` replacements as :func:`pre_caption`, then ``rstrip(' ')`` and truncation to
    ``max_words`` words. As in the official code there is *no* whitespace collapsing (and no ``<person>``
    replacement), and an empty result is allowed.
    """
    if not isinstance(question, str):
        raise ValueError(f"question must be a str, got {type(question).__name__}: {question!r}")
    text = _DELETED.sub("", question.lower()).replace("-", " ").replace("/", " ")
    text = text.rstrip(" ")
    words = text.split(" ")
    if max_words is not None and len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
