"""X-VLM (Zeng, Zhang, Li, ICML 2022) for Hugging Face Transformers.

    from modeling_xvlm import XVLMConfig, XVLMModel
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForZeroShotImageClassification

from .configuration_xvlm import XVLMConfig, XVLMTextConfig
from .modeling_xvlm import XVLMModel, XVLMOutput, XVLMPreTrainedModel
from .modeling_xvlm_grounding import XVLMForGrounding, XVLMForGroundingOutput
from .modeling_xvlm_pretraining import XVLMForPretraining, XVLMForPretrainingOutput
from .modeling_xvlm_retrieval import XVLMForRetrieval, XVLMForRetrievalOutput
from .modeling_xvlm_text import XVLMTextLMHeadModel, XVLMTextModel
from .retrieval import RetrievalOutput, retrieval_metrics

AutoConfig.register("xvlm", XVLMConfig, exist_ok=True)
AutoConfig.register("xvlm_text_model", XVLMTextConfig, exist_ok=True)
AutoModel.register(XVLMConfig, XVLMModel, exist_ok=True)
AutoModel.register(XVLMTextConfig, XVLMTextModel, exist_ok=True)
# Task heads: transformers has no Auto class for retrieval or box grounding. The retrieval head returns CLIP-style
# `logits_per_image` (image-text similarity / temperature), which is what the zero-shot image classification
# Auto class and pipeline use; the pre-training head fits `AutoModelForPreTraining`. `XVLMForGrounding` has no
# matching Auto class (`AutoModelForZeroShotObjectDetection` expects per-query detection outputs); load it directly.
AutoModelForZeroShotImageClassification.register(XVLMConfig, XVLMForRetrieval, exist_ok=True)
AutoModelForPreTraining.register(XVLMConfig, XVLMForPretraining, exist_ok=True)
from .hub import create_model_card  # noqa: E402  (remote-code auto_map registration, pipelines, model cards)

__version__ = "0.1.0"

__all__ = [
    "RetrievalOutput",
    "XVLMConfig",
    "XVLMForGrounding",
    "XVLMForGroundingOutput",
    "XVLMForPretraining",
    "XVLMForPretrainingOutput",
    "XVLMForRetrieval",
    "XVLMForRetrievalOutput",
    "XVLMModel",
    "XVLMOutput",
    "XVLMPreTrainedModel",
    "XVLMTextConfig",
    "XVLMTextLMHeadModel",
    "XVLMTextModel",
    "retrieval_metrics",
]
