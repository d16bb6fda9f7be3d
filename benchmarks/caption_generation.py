"""Benchmark 13: caption beam search at X-VLM-base size, the official cost structure vs the shipped decoding.

The measured work is captioning a batch of images end to end (Swin-B at 384 px, then 3-beam search from the
prompt `[CLS] a picture of`, total lengths 5 to 20 as `configs/Captioning.yaml`). Random weights, fixed seed,
fp32, sdpa. Both variants run the same beam-search bookkeeping (`official_beam_search`, the 4.12.5 loop):

- `official`: the official cost structure (`models/model_captioning.py` repeats the image embeddings `num_beams`
  times; `models/xbert.py` caches the self-attention keys/values only and projects the cross-attention keys/values
  of the repeated image sequence at every step). Reproduced by handing the decoder a plain `DynamicCache`, which
  holds self-attention only (`SelfAttentionCacheDecoder`); nothing in the shipped model is switched;
- `ours`: `XVLMForConditionalGeneration.generate(pixel_values, prompt)` as shipped.

`vision` (the image encoder alone, the same code in both) is timed in the same rounds, so the decoding time of each
variant is its total minus that. Agreement: identical token ids and the largest hypothesis-score gap. Structure:
the rows whose cross-attention keys each variant projects in one call (summed over steps), and the decoder calls.
"""

from __future__ import annotations

from typing import Any

import torch

from .cases import CLS_ID, PAD_ID, SEED, Case, make_pixels
from .harness import Variant, measure_interleaved

SEP_ID = 102
#: `[CLS] a picture of` in bert-base-uncased (the official prompt, 4 tokens); the tiny vocab has 128 ids
PROMPT_BASE = (CLS_ID, 1037, 3861, 1997)
PROMPT_TINY = (CLS_ID, 16, 5, 8)
NUM_BEAMS, MAX_LENGTH, MIN_LENGTH = 3, 20, 5


class SelfAttentionCacheDecoder:
    """The caption decoder run as the official: the image sequence repeated per beam (`encoder_hidden_states
    [encoder_index]`, `model_captioning.generate`'s `repeat_interleave`) and a plain `DynamicCache`, which holds
    the self-attention keys/values only (xbert's `past_key_value`), so every step projects the cross-attention
    keys/values of the repeated image sequence again."""

    def __init__(self, decoder: torch.nn.Module):
        self.decoder = decoder

    def __call__(
        self,
        *,
        encoder_hidden_states: torch.Tensor,
        encoder_index: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> Any:
        from transformers.cache_utils import DynamicCache

        if encoder_index is not None:
            encoder_hidden_states = encoder_hidden_states[encoder_index]
        if cache is None and use_cache:
            cache = DynamicCache(config=self.decoder.config)
        return self.decoder(encoder_hidden_states=encoder_hidden_states, cache=cache, use_cache=use_cache, **kwargs)


class _Counter:
    """Counts decoder calls and the rows the first cross-attention layer projects into keys."""

    def __init__(self, model: torch.nn.Module):
        self.calls, self.key_rows = 0, 0
        text = model.text_decoder.text_model
        key = text.encoder.layer[text.config.fusion_layer].crossattention.self.key
        self.handles = [
            model.text_decoder.register_forward_hook(lambda *_: self._call()),
            key.register_forward_hook(lambda _m, args, _o: self._rows(args[0])),
        ]

    def _call(self) -> None:
        self.calls += 1

    def _rows(self, states: torch.Tensor) -> None:
        self.key_rows += states.shape[0]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class CaptionGenerationCase(Case):
    number = "13"
    unit = "images"
    key = "caption_beam3"

    def __init__(self, images: int = 8, quick: bool = False):
        super().__init__(quick)
        self.images = 2 if quick else images
        self.items = self.images
        size = "tiny preset" if quick else "384 px"
        self.title = (f"caption beam search: {self.images} images at {size}, {NUM_BEAMS} beams, lengths "
                      f"{MIN_LENGTH}-{MAX_LENGTH} (official cost structure vs shipped)")

    def worker(self, warmup: int, repeats: int, log) -> dict[str, Any]:
        import modeling_xvlm
        from modeling_xvlm.official_generation import official_beam_search

        torch.manual_seed(SEED)
        preset = "tiny" if self.quick else "base"
        config = modeling_xvlm.XVLMConfig.from_preset(
            preset, text_config={"bos_token_id": CLS_ID, "eos_token_id": SEP_ID}
        )
        model = modeling_xvlm.XVLMForConditionalGeneration(config).eval()
        model.set_attn_implementation("sdpa")
        pixels = make_pixels(self.images, config.image_size)
        prompt = torch.tensor([PROMPT_TINY if self.quick else PROMPT_BASE] * self.images)
        lengths = {"num_beams": NUM_BEAMS, "max_length": MAX_LENGTH, "min_length": MIN_LENGTH}
        official_decoder = SelfAttentionCacheDecoder(model.text_decoder)

        @torch.no_grad()
        def official() -> tuple[torch.Tensor, torch.Tensor]:
            image = model.encode_image(pixels).last_hidden_state
            return official_beam_search(
                official_decoder, prompt, image, eos_token_id=SEP_ID, pad_token_id=PAD_ID, **lengths
            )

        @torch.no_grad()
        def ours() -> tuple[torch.Tensor, torch.Tensor]:
            out = model.generate(pixels, prompt, return_dict_in_generate=True, **lengths)
            return out.sequences, out.sequences_scores

        @torch.no_grad()
        def vision() -> torch.Tensor:
            return model.encode_image(pixels).last_hidden_state

        calls = {"official/fp32/sdpa": official, "ours/fp32/sdpa": ours, "vision/fp32/sdpa": vision}
        outputs, structure = {}, {}
        for name in ("official/fp32/sdpa", "ours/fp32/sdpa"):
            counter = _Counter(model)
            outputs[name] = calls[name]()
            counter.remove()
            structure[name] = {"decoder_calls": counter.calls, "cross_key_rows": counter.key_rows}
        official_ids, official_scores = outputs["official/fp32/sdpa"]
        our_ids, our_scores = outputs["ours/fp32/sdpa"]
        agreement = {
            "same_tokens": bool(torch.equal(official_ids, our_ids)),
            "score_max_abs_diff": float((official_scores - our_scores).abs().max()),
            "sequence_length": int(our_ids.shape[1]),
        }
        log(f"    agreement {agreement}, structure {structure}")
        if not agreement["same_tokens"]:
            raise AssertionError(f"the shipped decoding changed the official tokens: {official_ids} vs {our_ids}")
        timings = measure_interleaved(calls, max(0, warmup - 1), repeats, log)
        results = {
            name: {"variant": {**Variant("sdpa", "fp32").to_dict(), "name": name}, **timings[name].summary(self.items)}
            for name in calls
        }
        return {
            "case": self.describe(),
            "results": results,
            "agreement": agreement,
            "structure": structure,
            "image_tokens": int(config.num_patches + 1),
            "torch_threads": torch.get_num_threads(),
        }

    def compile_variants(self) -> list:
        return []


def caption_generation_cases(quick: bool = False) -> list[Case]:
    return [CaptionGenerationCase(quick=quick)]
