"""X-VLM (Zeng, Zhang, Li, ICML 2022) for Hugging Face Transformers.

    from modeling_xvlm import XVLMConfig, XVLMModel, XVLMProcessor

Importing the package registers it with transformers once (`hub.register_xvlm`: Auto classes, remote code,
pipelines); the task heads and their Auto classes are listed in `modeling_xvlm.tasks`.
"""

from .configuration_xvlm import XVLMConfig, XVLMTextConfig
from .hub import create_model_card, register_xvlm
from .modeling_xvlm import XVLMModel, XVLMOutput, XVLMPreTrainedModel
from .modeling_xvlm_captioning import XVLMForConditionalGeneration, XVLMForConditionalGenerationOutput
from .modeling_xvlm_grounding import XVLMForGrounding, XVLMForGroundingOutput
from .modeling_xvlm_nlvr import XVLMForImagesAndTextClassification, XVLMForTextAssignment
from .modeling_xvlm_pretraining import XVLMForPretraining, XVLMForPretrainingOutput
from .modeling_xvlm_retrieval import XVLMForRetrieval, XVLMForRetrievalOutput
from .modeling_xvlm_text import XVLMTextLMHeadModel, XVLMTextModel
from .modeling_xvlm_vqa import XVLMAnswerRankingOutput, XVLMForQuestionAnswering, XVLMForQuestionAnsweringOutput
from .processing import XVLMImageProcessor, XVLMImageProcessorPil, XVLMProcessor
from .quantization import quantize_int8
from .retrieval import RetrievalOutput, retrieval_metrics
from .tasks import TASKS, XVLMTask

register_xvlm()

__version__ = "0.1.0"

__all__ = [
    "TASKS",
    "RetrievalOutput",
    "XVLMConfig",
    "XVLMForConditionalGeneration",
    "XVLMForConditionalGenerationOutput",
    "XVLMForGrounding",
    "XVLMForGroundingOutput",
    "XVLMForImagesAndTextClassification",
    "XVLMAnswerRankingOutput",
    "XVLMForPretraining",
    "XVLMForPretrainingOutput",
    "XVLMForQuestionAnswering",
    "XVLMForQuestionAnsweringOutput",
    "XVLMForRetrieval",
    "XVLMForRetrievalOutput",
    "XVLMForTextAssignment",
    "XVLMImageProcessor",
    "XVLMImageProcessorPil",
    "XVLMModel",
    "XVLMOutput",
    "XVLMPreTrainedModel",
    "XVLMProcessor",
    "XVLMTask",
    "XVLMTextConfig",
    "XVLMTextLMHeadModel",
    "XVLMTextModel",
    "create_model_card",
    "quantize_int8",
    "register_xvlm",
    "retrieval_metrics",
]
