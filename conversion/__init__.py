"""Official X-VLM checkpoint conversion (installed as ``modeling_xvlm.conversion``).

Public API::

    from modeling_xvlm.conversion import convert_checkpoint
    model, result = convert_checkpoint("checkpoint_best.pth", "xvlm-coco", task="retrieval")

Command line: ``xvlm-convert`` / ``python -m modeling_xvlm.conversion`` (see ``docs/conversion.md``).
"""

from .convert_official import (
    HEAD_CLASS_NAMES,
    NEW_HEADS,
    NLVR2_TASKS,
    SOURCE_HEADS,
    TASKS,
    ConversionError,
    ConversionResult,
    build_config,
    convert_checkpoint,
    convert_state_dict,
    detect_task,
    head_class,
    load_into_model,
    write_model_card,
)
from .infer import ArchitectureInference, infer_architecture
from .official_config import OfficialConfig, parse_official_config, read_official_config
from .relative_position import (
    bisect_ratio,
    interpolate_relative_position_bias_table,
    not_a_knot_spline_matrix,
    source_grid,
)
from .safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_official_checkpoint, split_checkpoint

__all__ = [
    "ArchitectureInference",
    "ConversionError",
    "ConversionResult",
    "CorruptCheckpointError",
    "HEAD_CLASS_NAMES",
    "NEW_HEADS",
    "NLVR2_TASKS",
    "OfficialConfig",
    "SOURCE_HEADS",
    "TASKS",
    "UnsafeCheckpointError",
    "bisect_ratio",
    "build_config",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_task",
    "head_class",
    "infer_architecture",
    "interpolate_relative_position_bias_table",
    "load_into_model",
    "load_official_checkpoint",
    "not_a_knot_spline_matrix",
    "parse_official_config",
    "read_official_config",
    "source_grid",
    "split_checkpoint",
    "write_model_card",
]
