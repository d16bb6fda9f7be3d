"""Attention kernels and key masks shared by every X-VLM attention layer (Swin, text, fusion, decoder).

`XVLM_ATTENTION_FUNCTIONS` is transformers' attention registry with "sdpa" overridden locally by
`sdpa_where_it_pays_forward` (AttentionInterface's documented way for a model to override one function).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def expand_key_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a `(batch, n_keys)` 0/1 key mask into an additive `(batch, 1, 1, n_keys)` mask (0 or dtype-min).

    Returns `None` when nothing is masked, so SDPA can use its fastest kernel. The official code adds -10000
    (self-attention) or -1e9 (cross-attention); after the softmax both are exactly 0 in fp32, as is dtype-min.
    """
    if mask is None:
        return None
    if mask.dim() == 4:
        return mask.to(dtype)
    if bool(mask.all()):
        return None
    keep = mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


# ----------------------------------------------------------------------------------------------------------------
# Text / fusion encoder
# ----------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; inputs `(batch, heads, length, head_dim)`, output `(batch, length, heads, head_dim)`."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def sdpa_where_it_pays_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attn_implementation="sdpa"` of X-VLM's attention layers: torch's `scaled_dot_product_attention`, except for
    the backward-carrying calls on the CPU where it does not pay, which run the same math in `eager_attention_forward`.

    With autograd on the CPU, SDPA has a fused kernel only for calls without dropout and without a mask that
    needs a gradient; otherwise it falls back to its math kernel (the eager matmuls, plus an fp32 upcast of bf16
    inputs and a masked-row pass), and its fused backward is slow in bf16. Measured on X-VLM-base shapes
    (`python -m benchmarks.run --only attention_kernels`, docs/benchmarks.md "Attention kernels"), such calls
    are mostly 1.02-1.13x (fp32) and 1.2-2.3x (bf16) slower with SDPA, and with them the bf16 training step was
    8% slower than eager; fp32 calls without dropout or mask gradient are faster with SDPA. So on the CPU a call
    that needs gradients takes the eager kernel when it has dropout, a mask that needs a gradient (Swin's
    relative-position bias) or non-fp32 inputs. Inference and other devices always take SDPA.
    """
    if (
        query.device.type == "cpu"
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
        and (
            dropout > 0
            or query.dtype != torch.float32
            or (attention_mask is not None and attention_mask.requires_grad)
        )
    ):
        # No weights, as from SDPA: a returned weight tensor that needs a gradient but is never used breaks
        # reentrant gradient checkpointing of the layers that return it (Swin's).
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)[0], None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


#: The attention functions of all X-VLM attention layers (text, fusion and Swin through `XVLMSwinAttention`):
#: transformers' registry with "sdpa" overridden locally by
#: `sdpa_where_it_pays_forward` (AttentionInterface's documented way for a model to override one function).
XVLM_ATTENTION_FUNCTIONS = AttentionInterface()
XVLM_ATTENTION_FUNCTIONS["sdpa"] = sdpa_where_it_pays_forward

