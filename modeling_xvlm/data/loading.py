"""Loading X-VLM datasets (a local folder, a Hub id, or the synthetic dataset by default) with schema checks."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets

from .schemas import CONFIG_NAMES, SchemaMismatchError, check_features
from .synthetic import SyntheticConfig, write_synthetic_dataset

__all__ = [
    "default_cache_root",
    "synthetic_dataset_dir",
    "ensure_synthetic_dataset",
    "load_xvlm_dataset",
    "retrieval_pairs",
    "load_vqa_answer_list",
]

_COMPLETE_MARKER = "xvlm_dataset_info.json"


def default_cache_root() -> Path:
    """Root of the package's data cache: ``$XVLM_DATA_CACHE`` or ``$XDG_CACHE_HOME/modeling_xvlm`` (``~/.cache``)."""
    if os.environ.get("XVLM_DATA_CACHE"):
        return Path(os.environ["XVLM_DATA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modeling_xvlm"


def synthetic_dataset_dir(config: SyntheticConfig | None = None, cache_root: str | os.PathLike | None = None) -> Path:
    """The folder that holds the synthetic dataset of ``config`` in the cache (it may not exist yet)."""
    config = config or SyntheticConfig()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "synthetic" / config.cache_key()


def ensure_synthetic_dataset(
    config: SyntheticConfig | None = None, cache_root: str | os.PathLike | None = None, progress: bool = False
) -> Path:
    """Return the cached synthetic dataset folder of ``config``, generating it first if it is missing (``progress``:
    a progress bar while generating).

    The dataset is generated into a temporary sibling folder and renamed into place, so concurrent callers never see
    a half-written dataset (the first to finish wins; the others discard their copy).
    """
    config = config or SyntheticConfig()
    target = synthetic_dataset_dir(config, cache_root)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_synthetic_dataset(tmp, config, overwrite=True, progress=progress)
        os.chmod(tmp, 0o755)  # mkdtemp creates it private
        if target.exists() and not (target / _COMPLETE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete folder
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_xvlm_dataset(
    path_or_hub_id: str | os.PathLike | None = None,
    config_name: str = "pretrain",
    split: str | None = "train",
    *,
    synthetic_config: SyntheticConfig | None = None,
    cache_root: str | os.PathLike | None = None,
    validate: bool = True,
    **load_kwargs: Any,
) -> datasets.Dataset | datasets.DatasetDict:
    """Load configuration ``config_name`` of an X-VLM dataset and check its schema.

    Args:
        path_or_hub_id: a dataset folder written by ``xvlm-data`` (or any folder/Hub dataset with the same
            configurations). ``None`` uses the synthetic dataset of ``synthetic_config`` from the cache, generating
            it on first use (a few seconds).
        config_name: ``"pretrain"``, ``"retrieval"``, ``"grounding"``, ``"nlvr2"``, ``"vqa"`` or
            ``"vqa_answers"`` (split ``"test"`` only).
        split: ``"train"``, ``"validation"``, ``"test"`` (or any split / slice that ``datasets`` accepts); ``None``
            returns a ``DatasetDict`` of every split.
        synthetic_config: parameters of the default synthetic dataset.
        cache_root: where the synthetic dataset is cached (default :func:`default_cache_root`).
        validate: check the features against the schema (:func:`modeling_xvlm.data.schemas.check_features`).
        **load_kwargs: passed on to ``datasets.load_dataset`` (``cache_dir``, ``revision``, ``streaming``...).

    Raises:
        SchemaMismatchError: the data does not have the columns/types of ``config_name`` (every problem listed).
        ValueError: unknown configuration or split, with the available ones listed.
    """
    if config_name not in CONFIG_NAMES:
        raise ValueError(f"unknown X-VLM configuration {config_name!r}; expected one of {list(CONFIG_NAMES)}")
    if path_or_hub_id is None:
        path_or_hub_id = ensure_synthetic_dataset(synthetic_config, cache_root)
    source = str(path_or_hub_id)
    try:
        dataset = datasets.load_dataset(source, config_name, split=split, **load_kwargs)
    except ValueError as error:
        message = str(error)
        if "BuilderConfig" in message or "config" in message.lower() and "not found" in message.lower():
            raise ValueError(
                f"{source} has no X-VLM configuration {config_name!r} (an X-VLM dataset declares the configurations "
                f"{list(CONFIG_NAMES)} in the `configs:` block of its README.md; see docs/data.md). "
                f"datasets said: {message}"
            ) from error
        if "split" in message.lower():
            raise ValueError(f"{source} / {config_name!r} has no split {split!r}. datasets said: {message}") from error
        raise
    if validate:
        parts = dataset.items() if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)) else [
            (split, dataset)
        ]
        for part_name, part in parts:
            check_features(part.features, config_name, where=f"{source} [{config_name}/{part_name}]")
    return dataset


def retrieval_pairs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Expand ``retrieval`` rows (one image, several captions) into image-text pairs, one row per caption.

    The result has ``image``, ``caption``, ``image_id`` and ``image_index`` (a contiguous index per image, the
    official ``idx`` used for ITC multi-positives and ITM negative masking, official ``dataset/re_dataset.py``). Images are not decoded or
    re-encoded on the way.
    """
    if "captions" not in dataset.column_names:
        raise SchemaMismatchError("retrieval_pairs needs a `retrieval` dataset with a `captions` column")
    image_feature = dataset.features["image"]
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    raw = raw.add_column("image_index", list(range(len(raw))))

    def expand(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "caption": [], "image_id": [], "image_index": []}
        for image, captions, image_id, index in zip(
            batch["image"], batch["captions"], batch["image_id"], batch["image_index"]
        ):
            for caption in captions:
                out["image"].append(image)
                out["caption"].append(caption)
                out["image_id"].append(image_id)
                out["image_index"].append(index)
        return out

    pairs = raw.map(expand, batched=True, remove_columns=raw.column_names, desc="retrieval pairs")
    return pairs.cast_column("image", image_feature)


def load_vqa_answer_list(
    dataset: str | os.PathLike | None = None,
    *,
    synthetic_config: SyntheticConfig | None = None,
    cache_root: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> list[str]:
    """The candidate answers of the VQA ranking evaluation (the ``vqa_answers`` config, split ``test``), in order.

    ``dataset`` is a folder or Hub id as for :func:`load_xvlm_dataset`; ``None`` is the synthetic dataset (every
    answer its questions can have, sorted). For a converted dataset this is the official ``answer_list.json``.
    """
    answers = load_xvlm_dataset(dataset, "vqa_answers", "test", synthetic_config=synthetic_config,
                                cache_root=cache_root, **load_kwargs)
    return list(answers["answer"])

