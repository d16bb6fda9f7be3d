"""Official X-VLM checkpoint conversion (installed as ``modeling_xvlm.conversion``)."""
