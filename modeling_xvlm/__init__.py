"""X-VLM (Zeng, Zhang, Li, ICML 2022) for Hugging Face Transformers.

    from modeling_xvlm import XVLMConfig, XVLMModel
"""

from transformers import AutoConfig, AutoModel

from .configuration_xvlm import XVLMConfig, XVLMTextConfig
from .modeling_xvlm import XVLMModel, XVLMOutput, XVLMPreTrainedModel, XVLMTextModel

AutoConfig.register("xvlm", XVLMConfig, exist_ok=True)
AutoConfig.register("xvlm_text_model", XVLMTextConfig, exist_ok=True)
AutoModel.register(XVLMConfig, XVLMModel, exist_ok=True)
AutoModel.register(XVLMTextConfig, XVLMTextModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "XVLMConfig",
    "XVLMModel",
    "XVLMOutput",
    "XVLMPreTrainedModel",
    "XVLMTextConfig",
    "XVLMTextModel",
]
