"""Benchmark 7: VQA answer ranking at X-VLM-base size, the official order vs the first-step cache.

The measured work is `XVLMForQuestionAnswering.rank_candidates` on already encoded questions (the question encoder
is the same code either way): `questions` questions of random lengths, padded as a batch, ranked over `candidates`
answers of 1-6 word pieces (mostly one or two, as the VQA v2 answer list; padded to the longest) with the official
`k_test` = 128. Random weights, fixed seed, fp32, sdpa.

- `official`: `reuse_first_step=False`, the official `model_vqa.rank_answer` order: the decoder on `[CLS]`, then
  the top k decoded again from `[CLS]` with the question states tiled k times;
- `fast`: the default, the `[CLS]` step's KV cache (its self-attention entry and the question's cross-attention
  keys/values, once per question) repeated over the k candidates, padding columns the k do not reach dropped.

Both are timed interleaved in one process; agreement: identical chosen answers and rankings, largest score gap.
"""

from __future__ import annotations

from typing import Any

import torch

from .cases import CLS_ID, PAD_ID, SEED, Case, make_text
from .harness import Variant, measure_interleaved

SEP_ID = 102
#: share of candidates with 1, 2, 3, 4, 5, 6 word pieces
LENGTH_SHARES = (0.62, 0.24, 0.09, 0.03, 0.015, 0.005)


def make_candidates(n: int, vocab: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """`(n, 2 + longest)` candidates `[CLS] pieces [SEP]` padded with 0, and their mask."""
    generator = torch.Generator().manual_seed(seed + 1)
    lengths = torch.multinomial(torch.tensor(LENGTH_SHARES), n, replacement=True, generator=generator) + 1
    width = int(lengths.max()) + 2
    ids = torch.full((n, width), PAD_ID, dtype=torch.long)
    ids[:, 0] = CLS_ID
    for row, length in enumerate(lengths.tolist()):
        ids[row, 1 : 1 + length] = torch.randint(min(1000, vocab // 4), vocab, (length,), generator=generator)
        ids[row, 1 + length] = SEP_ID
    return ids, (ids != PAD_ID).long()


class AnswerRankingCase(Case):
    number = "7"
    unit = "questions"

    def __init__(self, questions: int = 8, candidates: int = 3128, k: int = 128, quick: bool = False):
        super().__init__(quick)
        self.questions, self.candidates, self.k = questions, candidates, k
        if quick:
            self.candidates, self.k = 64, 16
        self.items = questions
        self.key = f"vqa_rank_b{questions}_c{candidates}_k{k}"
        self.title = f"VQA answer ranking: {questions} questions x {candidates} candidates, k {k} (official order vs cache)"

    def worker(self, warmup: int, repeats: int, log) -> dict[str, Any]:
        import modeling_xvlm

        torch.manual_seed(SEED)
        preset = "tiny" if self.quick else "base"
        config = modeling_xvlm.XVLMConfig.from_preset(preset, text_config={"bos_token_id": CLS_ID, "eos_token_id": SEP_ID})
        model = modeling_xvlm.XVLMForQuestionAnswering(config).eval()
        model.set_attn_implementation("sdpa")
        vocab, hidden = config.text_config.vocab_size, config.text_config.hidden_size
        _, question_mask = make_text(self.questions, 20, vocab, min_length=6)
        question_states = torch.randn(self.questions, 20, hidden, generator=torch.Generator().manual_seed(SEED))
        answers, answer_mask = make_candidates(self.candidates, vocab)

        def ranking(reuse: bool):
            def call():
                with torch.no_grad():
                    return model.rank_candidates(
                        question_states, question_mask, answers, answer_mask, k=self.k, reuse_first_step=reuse
                    )

            return call

        calls = {"official/fp32/sdpa": ranking(False), "fast/fp32/sdpa": ranking(True)}
        official, fast = calls["official/fp32/sdpa"](), calls["fast/fp32/sdpa"]()
        agreement = {
            "same_chosen_answers": bool(torch.equal(official.candidate_indices[:, 0], fast.candidate_indices[:, 0])),
            "same_rankings": bool(torch.equal(official.candidate_indices, fast.candidate_indices)),
            "score_max_abs_diff": float((official.scores - fast.scores).abs().max()),
        }
        log(f"    agreement {agreement}")
        timings = measure_interleaved(calls, max(0, warmup - 1), repeats, log)
        results = {
            name: {"variant": {**Variant("sdpa", "fp32").to_dict(), "name": name}, **timings[name].summary(self.items)}
            for name in calls
        }
        return {
            "case": self.describe(),
            "results": results,
            "agreement": agreement,
            "answer_width": int(answers.shape[1]),
            "torch_threads": torch.get_num_threads(),
        }

    def compile_variants(self) -> list:
        return []


def answer_ranking_cases(quick: bool = False) -> list[Case]:
    return [AnswerRankingCase(quick=quick)]
