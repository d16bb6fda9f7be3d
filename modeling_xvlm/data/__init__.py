"""Datasets for X-VLM in the Hugging Face Hub format (see docs/data.md).

* :mod:`.schemas` - the ``datasets.Features`` of the ``pretrain``, ``retrieval``, ``grounding``, ``nlvr2``, ``vqa``
  and ``vqa_answers`` configurations,
  validation helpers and the folder writer (Parquet shards + dataset card);
* :mod:`.synthetic` - the deterministic synthetic-shapes generator, its vocabulary and tokenizer;
* :mod:`.official` - the converter from the official X-VLM JSON files (also COCO Karpathy captioning, stored as
  ``retrieval`` rows), :func:`coco_image_id` and :func:`load_coco_caption_references`;
* :mod:`.loading` - :func:`load_xvlm_dataset` (defaults to the cached synthetic dataset), :func:`load_vqa_answer_list`;
* :mod:`.cli` - the ``xvlm-data`` command.
"""

from .loading import (
    default_cache_root,
    ensure_synthetic_dataset,
    load_vqa_answer_list,
    load_xvlm_dataset,
    retrieval_pairs,
    synthetic_dataset_dir,
)
from .official import ConversionSummary, coco_image_id, convert_official, load_coco_caption_references
from .schemas import (
    CONFIG_NAMES,
    GROUNDING_FEATURES,
    NLVR2_FEATURES,
    PRETRAIN_FEATURES,
    RETRIEVAL_FEATURES,
    SPLITS,
    VQA_ANSWERS_FEATURES,
    VQA_FEATURES,
    DatasetFolderWriter,
    SchemaMismatchError,
    check_features,
    feature_mismatches,
    get_features,
    validate_record,
)
from .synthetic import (
    SyntheticConfig,
    generate_nlvr2_pairs,
    generate_split,
    generate_vqa_questions,
    synthetic_tokenizer,
    synthetic_vocabulary,
    vqa_answer_list,
    write_synthetic_dataset,
)

__all__ = [
    "CONFIG_NAMES",
    "SPLITS",
    "PRETRAIN_FEATURES",
    "RETRIEVAL_FEATURES",
    "GROUNDING_FEATURES",
    "NLVR2_FEATURES",
    "VQA_FEATURES",
    "VQA_ANSWERS_FEATURES",
    "SchemaMismatchError",
    "get_features",
    "feature_mismatches",
    "check_features",
    "validate_record",
    "DatasetFolderWriter",
    "SyntheticConfig",
    "generate_split",
    "generate_nlvr2_pairs",
    "generate_vqa_questions",
    "vqa_answer_list",
    "write_synthetic_dataset",
    "synthetic_vocabulary",
    "synthetic_tokenizer",
    "ConversionSummary",
    "convert_official",
    "coco_image_id",
    "load_coco_caption_references",
    "load_xvlm_dataset",
    "retrieval_pairs",
    "load_vqa_answer_list",
    "ensure_synthetic_dataset",
    "synthetic_dataset_dir",
    "default_cache_root",
]
