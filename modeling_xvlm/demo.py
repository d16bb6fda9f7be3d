"""A tiny end-to-end X-VLM inference on generated inputs: `python -m modeling_xvlm.demo`."""

from __future__ import annotations

import torch

from . import XVLMConfig, XVLMModel


def main() -> None:
    torch.manual_seed(0)
    config = XVLMConfig.from_preset("tiny")
    model = XVLMModel(config).eval()
    pixel_values = torch.randn(3, 3, config.image_size, config.image_size)
    input_ids = torch.randint(5, config.text_config.vocab_size, (3, 8))
    input_ids[:, 0] = 2
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    print("image sequence:", tuple(out.vision_model_output.last_hidden_state.shape))
    print("text states:   ", tuple(out.text_model_output.last_hidden_state.shape))
    print("ITC logits per image:\n", out.logits_per_image)


if __name__ == "__main__":
    main()
