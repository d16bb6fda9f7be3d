"""Self-critical sequence training (SCST) of the X-VLM captioner (official ``Captioning_scst.py``,
``utils.ScstRewardCriterion``, ``configs/Captioning_scst.yaml``).

Per batch of images, official ``scst_train_iter``:

1. the greedy baseline: the official ``greedy=True`` decoding (``generate(official_greedy=True)``: argmax, no
   minimum length, ``max_length`` 20 with the prompt), in eval mode under ``no_grad``;
2. ``num_samples`` (5) sampled captions per image in train mode (OSCAR's ``_generate_no_beam_search`` with
   ``do_sample=True``, temperature 1, ``top_k`` 0, ``top_p`` 1, no minimum length: :func:`sample_captions`), each
   with its log-probability = the MEAN log-probability of its sampled tokens up to and including [SEP], computed
   in the sampling pass itself, with gradients (as the official code does: no second, teacher-forced pass);
3. rewards: CIDEr-D of every caption against the image's references (:class:`~modeling_xvlm.caption_metrics.CiderD`
   with training-corpus document frequencies, sentences through ``scst_sentence``: trailing "." stripped,
   " <eos>" appended); advantage = CIDEr-D(sample) - CIDEr-D(greedy caption of its image);
4. ``loss = mean(-logprob * advantage)`` over the ``B * num_samples`` samples (:func:`scst_loss`).

:class:`XVLMSelfCriticalCaptioning` wraps an ``XVLMForConditionalGeneration`` so that the whole iteration is one
``forward`` (one DDP forward: the official script samples through the unwrapped model, which skips DDP's gradient
synchronisation). The sampling draws from a ``torch.Generator`` seeded with the batch's ``sample_seed``
(:class:`~modeling_xvlm.training.collators.XVLMCaptioningSCSTCollator`), so a step's samples depend only on the
step, and resume is exact (dropout uses the global RNG, saved in every checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..caption_metrics import CiderD, DocumentFrequencies, document_frequencies, scst_sentence
from ..modeling_xvlm_captioning import CAPTION_PROMPT, DEFAULT_MAX_LENGTH
from ..official_generation import _Decoder
from ..processing import pre_caption
from .collators import CAPTION_MAX_WORDS

__all__ = [
    "SCST_NUM_SAMPLES",
    "XVLMSCSTOutput",
    "XVLMSelfCriticalCaptioning",
    "sample_captions",
    "scst_document_frequencies",
    "scst_loss",
]

#: Sampled captions per image (official `sc_train_sample_n: 5`).
SCST_NUM_SAMPLES = 5


def sample_captions(
    decoder: nn.Module,
    input_ids: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    *,
    eos_token_id: int,
    pad_token_id: int = 0,
    max_length: int = DEFAULT_MAX_LENGTH,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """OSCAR's sampling of the official SCST (``xbert._generate_no_beam_search``, ``do_sample=True``, temperature
    1, no top-k / top-p filtering, no minimum length), with gradients.

    Each step draws ``multinomial(softmax(logits))``; finished rows get [PAD]; a row still open at ``max_length``
    has its last token replaced by [SEP]. A row's log-probability is the mean of ``log_softmax(logits)[token]``
    over the steps at which it was still open (its [SEP] included).

    Args:
        decoder: the caption decoder (``XVLMForConditionalGeneration.text_decoder``).
        input_ids: ``(N, P)`` prompts (``[CLS] a picture of``), one per sample.
        encoder_hidden_states: ``(N, 1 + patches, vision_width)`` the image sequence of each sample.
        max_length: total length with the prompt (official 20).
        generator: the RNG of the draws (default: torch's global one).

    Returns:
        ``(ids, logprobs)``: ``(N, max_length)`` the prompt, the caption, [SEP], then [PAD]; ``(N,)`` the mean token
        log-probabilities (differentiable).
    """
    if max_length <= input_ids.shape[1]:
        raise ValueError(
            f"max_length ({max_length}) counts the prompt ({input_ids.shape[1]} tokens) and must exceed it"
        )
    steps = _Decoder(decoder, encoder_hidden_states, None, None, use_cache)
    ids = input_ids
    unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
    logprobs, open_steps = [], []
    while ids.shape[1] < max_length:
        logits = steps.next_logits(ids).float()
        probs = F.softmax(logits, dim=-1)
        tokens = torch.multinomial(probs.detach(), num_samples=1, generator=generator).squeeze(1)
        logprobs.append(F.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1))
        open_steps.append(unfinished)
        tokens = tokens * unfinished + pad_token_id * (1 - unfinished)
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        steps.advance(None)
        unfinished = unfinished * (tokens != eos_token_id).long()
        if int(unfinished.max()) == 0:
            break
    if ids.shape[1] == max_length:
        ids[:, -1] = ids[:, -1].masked_fill(unfinished.bool(), eos_token_id)
    mask = torch.stack(open_steps, dim=1).float()
    mean_logprobs = (torch.stack(logprobs, dim=1) * mask).sum(dim=1) / mask.sum(dim=1)
    return F.pad(ids, (0, max_length - ids.shape[1]), value=pad_token_id), mean_logprobs


def scst_loss(
    sample_logprobs: torch.Tensor, sample_rewards: Any, greedy_rewards: Any
) -> torch.Tensor:
    """The official SCST loss (``ScstRewardCriterion.forward``, greedy baseline): ``mean(-logprob * (reward -
    baseline))`` over the ``B * n`` samples, sample ``i`` belonging to image ``i // n``.

    Args:
        sample_logprobs: ``(B * n,)`` the samples' mean token log-probabilities.
        sample_rewards: ``(B * n,)`` their CIDEr-D; greedy_rewards: ``(B,)`` the greedy captions' CIDEr-D.
    """
    sample = torch.as_tensor(np.asarray(sample_rewards), dtype=torch.float32, device=sample_logprobs.device)
    greedy = torch.as_tensor(np.asarray(greedy_rewards), dtype=torch.float32, device=sample_logprobs.device)
    if sample.dim() != 1 or greedy.dim() != 1 or sample.shape[0] != sample_logprobs.shape[0]:
        raise ValueError(f"expected (B * n,) sample rewards and log-probabilities and (B,) greedy rewards, got "
                         f"{tuple(sample.shape)}, {tuple(sample_logprobs.shape)} and {tuple(greedy.shape)}")
    if greedy.shape[0] == 0 or sample.shape[0] % greedy.shape[0]:
        raise ValueError(f"{sample.shape[0]} samples are not a whole number per image for {greedy.shape[0]} images")
    advantage = sample - greedy.repeat_interleave(sample.shape[0] // greedy.shape[0])
    return (-sample_logprobs * advantage).mean()


def scst_document_frequencies(
    captions_per_image: Sequence[Sequence[str]], max_words: int | None = CAPTION_MAX_WORDS
) -> DocumentFrequencies:
    """CIDEr-D document frequencies of training captions, one document per image, each caption
    ``pre_caption``-cleaned and through ``scst_sentence`` (ending in ``<eos>``), as the official cached
    ``coco-train-words.p`` counts them. Images without captions are skipped."""
    corpus = [[scst_sentence(pre_caption(c, max_words)) for c in captions] for captions in captions_per_image
              if captions]
    return document_frequencies(corpus)


@dataclass
class XVLMSCSTOutput(ModelOutput):
    """One SCST iteration (:class:`XVLMSelfCriticalCaptioning`).

    Args:
        loss: ``mean(-logprob * (CIDEr-D(sample) - CIDEr-D(greedy)))``.
        reward_sample: the mean CIDEr-D of the samples (official ``get_score``); reward_greedy: of the greedy
            captions.
        sample_logprobs: ``(B * n,)``; sample_rewards: ``(B * n,)``; greedy_rewards: ``(B,)``.
        samples, greedy: the decoded captions (``B * n`` and ``B``).
    """

    loss: torch.FloatTensor | None = None
    reward_sample: torch.FloatTensor | None = None
    reward_greedy: torch.FloatTensor | None = None
    sample_logprobs: torch.FloatTensor | None = None
    sample_rewards: torch.FloatTensor | None = None
    greedy_rewards: torch.FloatTensor | None = None
    samples: list[str] | None = None
    greedy: list[str] | None = None


class XVLMSelfCriticalCaptioning(nn.Module):
    """An ``XVLMForConditionalGeneration`` (``captioner``) trained by SCST: ``forward(pixel_values, references,
    sample_seed)`` runs one official iteration and returns its loss (:class:`XVLMSCSTOutput`).

    Args:
        captioner: the captioning model (official: a fine-tuned captioner).
        processor: its ``XVLMProcessor`` (the prompt ids, ``caption_prompt``; decoding the captions for the reward,
            ``post_process_captions``).
        cider: the reward, a :class:`~modeling_xvlm.caption_metrics.CiderD` with training-corpus document
            frequencies (:func:`scst_document_frequencies`, or the official ``coco-train-words.p``).
        prompt: the generation prompt (official ``'a picture of '``).
        num_samples: samples per image (official 5). max_length: total caption length with the prompt (official
            20, for the greedy baseline and the samples).
    """

    def __init__(
        self,
        captioner: nn.Module,
        processor: Any,
        cider: CiderD,
        prompt: str = CAPTION_PROMPT,
        num_samples: int = SCST_NUM_SAMPLES,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        self.captioner = captioner
        self.processor, self.cider, self.prompt = processor, cider, prompt
        self.num_samples, self.max_length = num_samples, max_length
        text = captioner.config.text_config
        self.eos_token_id = processor.tokenizer.sep_token_id if text.eos_token_id is None else int(text.eos_token_id)
        self.pad_token_id = 0 if text.pad_token_id is None else int(text.pad_token_id)

    @property
    def config(self) -> Any:
        return self.captioner.config

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        references: Sequence[Sequence[str]],
        sample_seed: torch.Tensor | int | None = None,
    ) -> XVLMSCSTOutput:
        """One SCST iteration on images ``(B, 3, H, W)`` with ``references`` (``B`` lists of captions)."""
        batch = pixel_values.shape[0]
        if len(references) != batch:
            raise ValueError(f"got {len(references)} reference lists for {batch} images")
        prompt = self.processor.caption_prompt(batch, self.prompt).to(pixel_values.device)
        greedy_ids = self._greedy(pixel_values, prompt)
        image = self.captioner.encode_image(pixel_values).last_hidden_state.repeat_interleave(self.num_samples, 0)
        generator = None
        if sample_seed is not None:
            generator = torch.Generator(device=pixel_values.device).manual_seed(int(sample_seed))
        sample_ids, logprobs = sample_captions(
            self.captioner.text_decoder, prompt.repeat_interleave(self.num_samples, 0), image,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, max_length=self.max_length,
            generator=generator,
        )
        samples = self.processor.post_process_captions(sample_ids, self.prompt)
        greedy = self.processor.post_process_captions(greedy_ids, self.prompt)
        refs = [list(r) for r in references]
        sample_rewards = self.cider.scst_scores(samples, [r for r in refs for _ in range(self.num_samples)])
        greedy_rewards = self.cider.scst_scores(greedy, refs)
        loss = scst_loss(logprobs, sample_rewards, greedy_rewards)
        as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=loss.device)  # noqa: E731
        return XVLMSCSTOutput(
            loss=loss,
            reward_sample=as_tensor(sample_rewards.mean()),
            reward_greedy=as_tensor(greedy_rewards.mean()),
            sample_logprobs=logprobs,
            sample_rewards=as_tensor(sample_rewards),
            greedy_rewards=as_tensor(greedy_rewards),
            samples=samples,
            greedy=greedy,
        )

    @torch.no_grad()
    def _greedy(self, pixel_values: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The official greedy baseline, in eval mode (dropout off) under no_grad."""
        was_training = self.captioner.training
        self.captioner.eval()
        try:
            return self.captioner.generate(pixel_values, input_ids=prompt, official_greedy=True,
                                           max_length=self.max_length)
        finally:
            self.captioner.train(was_training)
