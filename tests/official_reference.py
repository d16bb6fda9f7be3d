"""An independent, functional re-implementation of the OFFICIAL X-VLM forward (Swin variant).

Written from the official code's semantics as digested in `official-xvlm.md` (§1.2 Swin, §1.5 xbert, §2 heads and
losses); it shares no code with `modeling_xvlm`. Every function reads an *official-format* state dict (keys such as
`vision_encoder.layers.0.blocks.0.attn.qkv.weight`, `text_encoder.bert.encoder.layer.3.attention.self.query.weight`)
and computes in fp32, so it is a yardstick for both the converter and the model:

- Swin: patch embedding conv + LayerNorm; blocks `x + WMSA(LN1(x))`, `x + MLP(LN2(x))` with a *fused* `qkv`
  (rows q, k, v), q scaled by head_dim^-0.5, relative position bias from the table, cyclic shift of window//2 on odd
  blocks with the 9-region -100 mask, window shrunk to the resolution (and no shift) when resolution <= window;
  patch merging `cat(x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2])` -> LN -> Linear (no bias); final LN;
  CLS-like token = mean of the normed patch tokens; a region's token 0 = the mask-weighted mean of its image's
  patches.
- xbert: word + token type 0 + absolute position embeddings -> LN; post-LN layers; self-attention mask
  `(1 - m) * -10000`; fusion layers (index >= fusion_layer) cross-attend to the image tokens with mask
  `(1 - m) * -1e9`; exact-erf GELU feed-forward. Modes 'text', 'fusion' and 'multi_modal'.
- Heads: `build_mlp` (Linear, LayerNorm eps 1e-5, GELU, Linear), ITC features `normalize(proj(x[:, 0]))`, the MLM
  head (transform dense -> GELU -> LN -> decoder tied to the word embeddings + bias) on gathered masked positions.
- Losses: ITC (with or without `idx`), ITM with hard negatives (per-row `torch.multinomial`, image negatives first,
  exactly in the official order), MLM cross-entropy (ignore -100), box L1 + GIoU (DETR box ops, batch zeroing).
- NLVR2 (`model_nlvr.py`, `NLVR.py`): both images through Swin as one batch `cat([image0, image1])`, split at B;
  the whole 18-layer stack in multi_modal mode with a *list* of image sequences, fusion layer `l` reading entry
  `(l - fusion_layer) % 2`; `cls_head` (build_mlp) on the final [CLS]; cross-entropy; argmax prediction.
- Text assignment (`model_nlvr_pretrain.py`): ITC image features, softmax(sim / 0.07) with the diagonal zeroed, per
  example `torch.rand(1) > 1/3` -> one `multinomial` negative and `torch.rand(1) > 0.5` for its side (labels 0 / 1),
  else two `multinomial` negatives (label 2); `ta_head` (Linear) on the final [CLS]; cross-entropy.
- VQA (`model_vqa.py`): the question through the whole `text_encoder` stack with the image (all-ones image mask);
  the answer decoder `text_decoder.bert` (every layer cross-attends to the question states with the question mask,
  -1e9) with the self-attention mask `causal * padding` (-10000), its `cls.predictions` head (decoder weight and
  bias); the loss `sum_i w_i * sum_t NLL(logits[:, :-1], targets[:, 1:])` / B with pads as -100 and each
  question's states listed once per answer; `rank_answer`: `[CLS]` alone (no mask) -> first-token probabilities of
  every candidate -> top k -> teacher-forced losses of those k with the question states tiled k times (`tile`) ->
  `log(prob_first) - loss` (first token counted twice) -> softmax -> top k.
- Captioning (`model_captioning.py`): in `official_captioning_reference.py`, built on the functions here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]

SWIN_EPS = 1e-5
MLP_HEAD_EPS = 1e-5


def _linear(sd: StateDict, prefix: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def _layer_norm(sd: StateDict, prefix: str, x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


# --------------------------------------------------------------------------------------------------------------
# Swin buffers (also used to build official-format state dicts)
# --------------------------------------------------------------------------------------------------------------


def relative_position_index(window: int) -> Tensor:
    """index(i, j) = (h_i - h_j + w - 1) * (2w - 1) + (w_i - w_j + w - 1), tokens in row-major (ij) order."""
    hh, ww = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    h = hh.flatten()
    w = ww.flatten()
    return (h[:, None] - h[None, :] + window - 1) * (2 * window - 1) + (w[:, None] - w[None, :] + window - 1)


def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] -> [B * nW, window, window, C] (windows in row-major order)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def shift_attention_mask(resolution: int, window: int, shift: int) -> Tensor:
    """The official `attn_mask` [nW, w^2, w^2]: 9 regions from slices [0:-w], [-w:-s], [-s:]; -100 across regions."""
    labels = torch.zeros(1, resolution, resolution, 1)
    count = 0
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in slices:
        for ws in slices:
            labels[:, hs, ws, :] = count
            count += 1
    windows = window_partition(labels, window).view(-1, window * window)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def stage_geometry(image_res: int, patch: int, depths: list[int], window: int) -> list[tuple[int, int, int]]:
    """Per stage: (resolution, effective window, shift of odd blocks)."""
    out = []
    res = image_res // patch
    for _ in depths:
        if res <= window:
            out.append((res, res, 0))
        else:
            out.append((res, window, window // 2))
        res //= 2
    return out


# --------------------------------------------------------------------------------------------------------------
# Swin forward
# --------------------------------------------------------------------------------------------------------------


def _window_attention(sd: StateDict, prefix: str, x: Tensor, heads: int, window: int, mask: Tensor | None) -> Tensor:
    b_, n, c = x.shape
    head_dim = c // heads
    qkv = _linear(sd, prefix + ".qkv", x).reshape(b_, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * head_dim**-0.5
    attn = q @ k.transpose(-2, -1)
    table = sd[prefix + ".relative_position_bias_table"]
    bias = table[relative_position_index(window).view(-1)].view(n, n, -1).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        n_windows = mask.shape[0]
        attn = attn.view(b_ // n_windows, n_windows, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b_, n, c)
    return _linear(sd, prefix + ".proj", out)


def _swin_block(sd: StateDict, prefix: str, x: Tensor, res: int, heads: int, window: int, shift: int) -> Tensor:
    b, length, c = x.shape
    shortcut = x
    x = _layer_norm(sd, prefix + ".norm1", x, SWIN_EPS).view(b, res, res, c)
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows = window_partition(x, window).view(-1, window * window, c)
    mask = shift_attention_mask(res, window, shift).to(x.dtype) if shift > 0 else None
    attn = _window_attention(sd, prefix + ".attn", windows, heads, window, mask)
    x = window_reverse(attn.view(-1, window, window, c), window, res, res)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + x.reshape(b, length, c)
    hidden = _layer_norm(sd, prefix + ".norm2", x, SWIN_EPS)
    return x + _linear(sd, prefix + ".mlp.fc2", F.gelu(_linear(sd, prefix + ".mlp.fc1", hidden)))


def _patch_merging(sd: StateDict, prefix: str, x: Tensor, res: int) -> Tensor:
    b, _, c = x.shape
    x = x.view(b, res, res, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    x = _layer_norm(sd, prefix + ".norm", x.view(b, -1, 4 * c), SWIN_EPS)
    return F.linear(x, sd[prefix + ".reduction.weight"])


def swin_patch_tokens(sd: StateDict, image: Tensor, image_res: int, window: int, prefix: str = "vision_encoder.") -> Tensor:
    """Final-LayerNormed patch tokens [B, L, C] of the official Swin."""
    weight = sd[prefix + "patch_embed.proj.weight"]
    patch = weight.shape[-1]
    assert image.shape[-1] == image_res and image.shape[-2] == image_res, "official Swin asserts the input size"
    x = F.conv2d(image, weight, sd[prefix + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = _layer_norm(sd, prefix + "patch_embed.norm", x, SWIN_EPS)
    depths = []
    while any(k.startswith(f"{prefix}layers.{len(depths)}.") for k in sd):
        depths.append(sum(1 for k in sd if k.startswith(f"{prefix}layers.{len(depths)}.blocks.") and k.endswith(".norm1.weight")))
    for stage, (res, stage_window, shift) in enumerate(stage_geometry(image_res, patch, depths, window)):
        heads = sd[f"{prefix}layers.{stage}.blocks.0.attn.relative_position_bias_table"].shape[1]
        for block in range(depths[stage]):
            x = _swin_block(
                sd, f"{prefix}layers.{stage}.blocks.{block}", x, res, heads, stage_window, 0 if block % 2 == 0 else shift
            )
        if stage < len(depths) - 1:
            x = _patch_merging(sd, f"{prefix}layers.{stage}.downsample", x, res)
    return _layer_norm(sd, prefix + "norm", x, SWIN_EPS)


def image_sequence(patches: Tensor) -> Tensor:
    """`[mean over patches ; patches]` (the official avgpool after the final norm)."""
    return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


def region_sequence(patches: Tensor, idx_to_group_img: Tensor, image_atts: Tensor) -> Tensor:
    """Official region embeds: token 0 = sum(m * x) / sum(m) over the source image's patches, then all patches."""
    x_bs = patches[idx_to_group_img]
    weights = image_atts[:, 1:].unsqueeze(2).to(patches.dtype)
    cls = (weights * x_bs).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
    return torch.cat([cls, x_bs], dim=1)


# --------------------------------------------------------------------------------------------------------------
# xbert
# --------------------------------------------------------------------------------------------------------------


class TextSpec:
    """What the xbert forward needs besides the weights (not all of it is in the state dict)."""

    def __init__(self, num_heads: int, fusion_layer: int, num_layers: int, eps: float = 1e-12):
        self.num_heads = num_heads
        self.fusion_layer = fusion_layer
        self.num_layers = num_layers
        self.eps = eps


def text_prefix(sd: StateDict) -> str:
    return "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in sd) else "text_encoder."


def _bert_attention(sd: StateDict, prefix: str, x: Tensor, kv: Tensor, additive: Tensor, spec: TextSpec) -> Tensor:
    b, length, hidden = x.shape
    head_dim = hidden // spec.num_heads

    def heads(t: Tensor) -> Tensor:
        return t.view(b, t.shape[1], spec.num_heads, head_dim).transpose(1, 2)

    q = heads(_linear(sd, prefix + ".self.query", x))
    k = heads(_linear(sd, prefix + ".self.key", kv))
    v = heads(_linear(sd, prefix + ".self.value", kv))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + additive
    context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, length, hidden)
    return _layer_norm(sd, prefix + ".output.LayerNorm", _linear(sd, prefix + ".output.dense", context) + x, spec.eps)


def bert_embeddings(sd: StateDict, input_ids: Tensor, spec: TextSpec, prefix: str | None = None) -> Tensor:
    """`prefix`: the BERT's key prefix (default: the text encoder's, `text_prefix(sd)`)."""
    p = (text_prefix(sd) if prefix is None else prefix) + "embeddings."
    length = input_ids.shape[1]
    x = sd[p + "word_embeddings.weight"][input_ids] + sd[p + "token_type_embeddings.weight"][0]
    x = x + sd[p + "position_embeddings.weight"][:length].unsqueeze(0)
    return _layer_norm(sd, p + "LayerNorm", x, spec.eps)


def bert_layers(
    sd: StateDict,
    x: Tensor,
    text_atts: Tensor,
    layers: range,
    spec: TextSpec,
    image_embeds: Tensor | None = None,
    image_atts: Tensor | None = None,
    prefix: str | None = None,
) -> Tensor:
    """`image_embeds` / `image_atts` may be lists (official NLVR2): fusion layer `l` reads entry
    `(l - fusion_layer) % len(image_embeds)` (xbert `BertLayer.forward`). `text_atts` is `[B, L]` (padding) or
    `[B, L, L]` (a decoder's `causal * padding`); `prefix`: the BERT's key prefix (default `text_prefix(sd)`)."""
    p = (text_prefix(sd) if prefix is None else prefix) + "encoder.layer."
    extended = text_atts[:, None, None, :] if text_atts.dim() == 2 else text_atts[:, None, :, :]
    self_mask = (1.0 - extended.to(x.dtype)) * -10000.0
    images: list[Tensor] = []
    cross_masks: list[Tensor] = []
    if image_embeds is not None:
        images = list(image_embeds) if isinstance(image_embeds, (list, tuple)) else [image_embeds]
        if image_atts is None:
            masks = [torch.ones(image.shape[:2]) for image in images]
        else:
            masks = list(image_atts) if isinstance(image_atts, (list, tuple)) else [image_atts]
        cross_masks = [(1.0 - m[:, None, None, :].to(x.dtype)) * -1e9 for m in masks]
    for layer in layers:
        x = _bert_attention(sd, f"{p}{layer}.attention", x, x, self_mask, spec)
        if layer >= spec.fusion_layer:
            slot = (layer - spec.fusion_layer) % len(images)
            x = _bert_attention(sd, f"{p}{layer}.crossattention", x, images[slot], cross_masks[slot], spec)
        hidden = F.gelu(_linear(sd, f"{p}{layer}.intermediate.dense", x))
        x = _layer_norm(sd, f"{p}{layer}.output.LayerNorm", _linear(sd, f"{p}{layer}.output.dense", hidden) + x, spec.eps)
    return x


def text_mode(sd: StateDict, input_ids: Tensor, text_atts: Tensor, spec: TextSpec) -> Tensor:
    """`get_text_embeds`: embeddings + layers [0, fusion_layer)."""
    return bert_layers(sd, bert_embeddings(sd, input_ids, spec), text_atts, range(spec.fusion_layer), spec)


def fusion_mode(
    sd: StateDict, text_embeds: Tensor, text_atts: Tensor, image_embeds: Tensor, image_atts: Tensor, spec: TextSpec
) -> Tensor:
    """`get_cross_embeds(text_embeds=...)`: layers [fusion_layer, num_layers) with cross-attention."""
    return bert_layers(
        sd, text_embeds, text_atts, range(spec.fusion_layer, spec.num_layers), spec, image_embeds, image_atts
    )


def multi_modal_mode(
    sd: StateDict, input_ids: Tensor, text_atts: Tensor, image_embeds: Tensor, image_atts: Tensor, spec: TextSpec
) -> Tensor:
    """The default mode (MLM): embeddings + all layers."""
    return bert_layers(
        sd, bert_embeddings(sd, input_ids, spec), text_atts, range(spec.num_layers), spec, image_embeds, image_atts
    )


# --------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------


def mlp_head(sd: StateDict, prefix: str, x: Tensor) -> Tensor:
    h = _linear(sd, prefix + ".0", x)
    h = F.gelu(_layer_norm(sd, prefix + ".1", h, MLP_HEAD_EPS))
    return _linear(sd, prefix + ".3", h)


def itc_features(sd: StateDict, image_embeds: Tensor, text_embeds: Tensor) -> tuple[Tensor, Tensor]:
    image_feat = F.normalize(_linear(sd, "vision_proj", image_embeds[:, 0]), dim=-1)
    text_feat = F.normalize(_linear(sd, "text_proj", text_embeds[:, 0]), dim=-1)
    return image_feat, text_feat


def mlm_logits(sd: StateDict, sequence: Tensor, masked_pos: Tensor | None, spec: TextSpec) -> Tensor:
    """Official `BertForMaskedLM` head: gather at `masked_pos` (if given), transform, tied decoder + bias."""
    if masked_pos is not None:
        sequence = torch.gather(sequence, 1, masked_pos.unsqueeze(-1).expand(-1, -1, sequence.shape[-1]))
    p = "text_encoder.cls.predictions."
    h = F.gelu(_linear(sd, p + "transform.dense", sequence))
    h = _layer_norm(sd, p + "transform.LayerNorm", h, spec.eps)
    word = sd[text_prefix(sd) + "embeddings.word_embeddings.weight"]
    return F.linear(h, word) + sd[p + "bias"]


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


def itc_loss(image_feat: Tensor, text_feat: Tensor, temp: Tensor, idx: Tensor | None = None) -> Tensor:
    logits = image_feat @ text_feat.t() / temp
    if idx is None:
        labels = torch.arange(logits.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    idx = idx.view(-1, 1)
    positives = torch.eq(idx, idx.t()).float()
    targets = positives / positives.sum(1, keepdim=True)
    loss_i2t = -torch.sum(F.log_softmax(logits, dim=1) * targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(logits.t(), dim=1) * targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def itm_negatives(image_feat: Tensor, text_feat: Tensor, temp: Tensor, idx: Tensor | None = None) -> tuple[list[int], list[int]]:
    """Official hard-negative sampling: per-row `torch.multinomial`, all image negatives first, then text ones."""
    with torch.no_grad():
        weights_i2t = F.softmax(image_feat @ text_feat.t() / temp, dim=1) + 1e-5
        weights_t2i = F.softmax(text_feat @ image_feat.t() / temp, dim=1) + 1e-5
        if idx is None:
            weights_i2t.fill_diagonal_(0)
            weights_t2i.fill_diagonal_(0)
        else:
            mask = torch.eq(idx.view(-1, 1), idx.view(1, -1))
            weights_i2t.masked_fill_(mask, 0)
            weights_t2i.masked_fill_(mask, 0)
    bs = image_feat.shape[0]
    neg_images = [torch.multinomial(weights_t2i[b], 1).item() for b in range(bs)]
    neg_texts = [torch.multinomial(weights_i2t[b], 1).item() for b in range(bs)]
    return neg_images, neg_texts


def itm_logits_and_loss(
    sd: StateDict,
    image_embeds: Tensor,
    image_atts: Tensor,
    text_embeds: Tensor,
    text_atts: Tensor,
    neg_images: list[int],
    neg_texts: list[int],
    spec: TextSpec,
) -> tuple[Tensor, Tensor]:
    """Official `get_matching_loss` given the sampled negatives: logits [3B, 2] and the loss."""
    bs = image_embeds.shape[0]
    image_neg, atts_neg = image_embeds[neg_images], image_atts[neg_images]
    text_neg, text_atts_neg = text_embeds[neg_texts], text_atts[neg_texts]
    cross_pos = fusion_mode(sd, text_embeds, text_atts, image_embeds, image_atts, spec)[:, 0]
    cross_neg = fusion_mode(
        sd,
        torch.cat([text_embeds, text_neg]),
        torch.cat([text_atts, text_atts_neg]),
        torch.cat([image_neg, image_embeds]),
        torch.cat([atts_neg, image_atts]),
        spec,
    )[:, 0]
    logits = mlp_head(sd, "itm_head", torch.cat([cross_pos, cross_neg]))
    labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
    return logits, F.cross_entropy(logits, labels)


def mlm_loss(logits: Tensor, masked_ids: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), masked_ids.reshape(-1), ignore_index=-100)


def predict_bbox(sd: StateDict, full_image_embeds: Tensor, text_embeds: Tensor, text_atts: Tensor, spec: TextSpec) -> Tensor:
    """Official `predict_bbox`: fusion with an all-ones image mask, token 0, bbox_head, sigmoid -> (cx, cy, w, h)."""
    ones = torch.ones(full_image_embeds.shape[:2])
    out = fusion_mode(sd, text_embeds, text_atts, full_image_embeds, ones, spec)[:, 0]
    return mlp_head(sd, "bbox_head", out).sigmoid()


def _xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _generalized_iou_diag(a: Tensor, b: Tensor) -> Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union
    lt_c = torch.min(a[:, None, :2], b[None, :, :2])
    rb_c = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    enclosing = wh_c[..., 0] * wh_c[..., 1]
    return torch.diag(iou - (enclosing - union) / enclosing)


def bbox_losses(pred: Tensor, target: Tensor, is_image: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Official `get_bbox_loss`: (sum of L1 over boxes and coordinates, sum of 1 - GIoU) / num_boxes."""
    l1 = F.l1_loss(pred, target, reduction="none")
    a, b = _xyxy(pred), _xyxy(target)
    if (a[:, 2:] < a[:, :2]).any() or (b[:, 2:] < b[:, :2]).any():
        giou = torch.zeros(pred.shape[0])
    else:
        giou = 1 - _generalized_iou_diag(a, b)
    if is_image is None:
        num_boxes = target.shape[0]
    else:
        num_boxes = torch.sum(1 - is_image)
        l1 = l1 * (1 - is_image.view(-1, 1))
        giou = giou * (1 - is_image)
    return l1.sum() / num_boxes, giou.sum() / num_boxes


# --------------------------------------------------------------------------------------------------------------
# NLVR2 and its text-assignment pre-training
# --------------------------------------------------------------------------------------------------------------


def nlvr2_forward(
    sd: StateDict,
    image0: Tensor,
    image1: Tensor,
    input_ids: Tensor,
    text_atts: Tensor,
    spec: TextSpec,
    image_res: int,
    window: int,
    targets: Tensor | None = None,
) -> dict[str, Tensor]:
    """Official `model_nlvr.XVLM.forward` (spec.num_layers = the 18-layer NLVR2 stack): image sequences of both
    images, the fused [CLS], `cls_head` logits, the argmax prediction and, with `targets`, the loss."""
    image_embeds = image_sequence(swin_patch_tokens(sd, torch.cat([image0, image1]), image_res, window))
    image0_embeds, image1_embeds = torch.split(image_embeds, input_ids.shape[0])
    atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    cls = multi_modal_mode(
        sd, input_ids, text_atts, [image0_embeds, image1_embeds], [atts[: image0_embeds.shape[0]], atts[image0_embeds.shape[0] :]], spec
    )[:, 0]
    logits = mlp_head(sd, "cls_head", cls)
    out = {"image0": image0_embeds, "image1": image1_embeds, "cls": cls, "logits": logits, "prediction": logits.argmax(1)}
    if targets is not None:
        out["loss"] = F.cross_entropy(logits, targets)
    return out


def ta_image_features(sd: StateDict, image_embeds: Tensor) -> Tensor:
    """Official `get_features(image_embeds=...)`: `normalize(vision_proj(image_embeds[:, 0]))`."""
    return F.normalize(_linear(sd, "vision_proj", image_embeds[:, 0]), dim=-1)


def ta_sample(image_feat: Tensor) -> tuple[list[int], list[int], list[int]]:
    """The official TA sampling, in its order of random draws: (left image rows, right image rows, labels)."""
    with torch.no_grad():
        weights = F.softmax(image_feat @ image_feat.t() / 0.07, dim=1)
        weights.fill_diagonal_(0)
    left, right, labels = [], [], []
    for b in range(image_feat.shape[0]):
        if torch.rand(1) > 1 / 3:
            idx = torch.multinomial(weights[b], 1).item()
            if torch.rand(1) > 0.5:
                left.append(b)
                right.append(idx)
                labels.append(0)
            else:
                right.append(b)
                left.append(idx)
                labels.append(1)
        else:
            idx = torch.multinomial(weights[b], 2)
            left.append(int(idx[0]))
            right.append(int(idx[1]))
            labels.append(2)
    return left, right, labels


def ta_forward(
    sd: StateDict,
    image: Tensor,
    input_ids: Tensor,
    text_atts: Tensor,
    spec: TextSpec,
    image_res: int,
    window: int,
    pairs: tuple[list[int], list[int], list[int]] | None = None,
) -> dict[str, object]:
    """Official `model_nlvr_pretrain.XVLM.forward`; `pairs` = fixed (left rows, right rows, labels), else sampled
    with `ta_sample` (seed the global RNG before the call)."""
    image_embeds = image_sequence(swin_patch_tokens(sd, image, image_res, window))
    if pairs is None:
        pairs = ta_sample(ta_image_features(sd, image_embeds))
    left, right, labels = pairs
    atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    inputs = [torch.stack([image_embeds[i] for i in left]), torch.stack([image_embeds[i] for i in right])]
    cls = multi_modal_mode(sd, input_ids, text_atts, inputs, [atts, atts], spec)[:, 0]
    logits = _linear(sd, "ta_head", cls)
    target = torch.tensor(labels, dtype=torch.long)
    return {"left": left, "right": right, "labels": target, "logits": logits, "loss": F.cross_entropy(logits, target)}


# --------------------------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------------------------

VQA_DECODER = "text_decoder.bert."
VQA_HEAD = "text_decoder.cls.predictions."


def vqa_question_states(
    sd: StateDict, image: Tensor, input_ids: Tensor, question_atts: Tensor, spec: TextSpec, image_res: int, window: int
) -> Tensor:
    """Official `text_encoder(question, attention_mask, encoder_hidden_states=image_embeds, ones)`: [B, Lq, H]."""
    image_embeds = image_sequence(swin_patch_tokens(sd, image, image_res, window))
    ones = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    return multi_modal_mode(sd, input_ids, question_atts, image_embeds, ones, spec)


def vqa_decoder_logits(
    sd: StateDict,
    answer_ids: Tensor,
    answer_atts: Tensor | None,
    question_states: Tensor,
    question_atts: Tensor,
    decoder_spec: TextSpec,
) -> Tensor:
    """Official `text_decoder(answer_ids, attention_mask, encoder_hidden_states=question_states, question_atts)`
    logits [N, La, V]: `BertLMHeadModel` (is_decoder) self-attention mask `causal[i, j] = j <= i` times the padding
    mask (all ones when `answer_atts` is None), every layer cross-attending (fusion_layer 0); the LM head's decoder
    weight and `cls.predictions.bias`."""
    n, length = answer_ids.shape
    if answer_atts is None:
        answer_atts = torch.ones(n, length)
    positions = torch.arange(length)
    causal = (positions[None, :] <= positions[:, None]).to(torch.float32)
    self_atts = causal[None, :, :] * answer_atts[:, None, :].to(torch.float32)
    x = bert_embeddings(sd, answer_ids, decoder_spec, prefix=VQA_DECODER)
    x = bert_layers(
        sd, x, self_atts, range(decoder_spec.num_layers), decoder_spec, question_states, question_atts, VQA_DECODER
    )
    h = F.gelu(_linear(sd, VQA_HEAD + "transform.dense", x))
    h = _layer_norm(sd, VQA_HEAD + "transform.LayerNorm", h, decoder_spec.eps)
    return F.linear(h, sd[VQA_HEAD + "decoder.weight"]) + sd[VQA_HEAD + "bias"]


def vqa_answer_loss(logits: Tensor, answer_ids: Tensor, pad_id: int = 0) -> Tensor:
    """Official `reduction='none'` decoder loss: targets = ids with pads as -100, CE of `logits[:, :-1]` against
    `targets[:, 1:]`, summed per answer: [N]."""
    targets = answer_ids.masked_fill(answer_ids == pad_id, -100)
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), reduction="none"
    )
    return nll.view(logits.shape[0], -1).sum(1)


def vqa_forward(
    sd: StateDict,
    image: Tensor,
    input_ids: Tensor,
    question_atts: Tensor,
    answer_ids: Tensor,
    answer_atts: Tensor,
    k: list[int],
    weights: Tensor,
    spec: TextSpec,
    decoder_spec: TextSpec,
    image_res: int,
    window: int,
    pad_id: int = 0,
) -> dict[str, Tensor]:
    """Official `model_vqa.XVLM.forward(train=True)`: question states; each question's states and mask listed
    `k[b]` times; the decoder on the answers; `loss = (weights * answer_loss).sum() / B`."""
    states = vqa_question_states(sd, image, input_ids, question_atts, spec, image_res, window)
    rows, atts = [], []
    for b, n in enumerate(k):
        rows += [states[b]] * n
        atts += [question_atts[b]] * n
    logits = vqa_decoder_logits(sd, answer_ids, answer_atts, torch.stack(rows), torch.stack(atts), decoder_spec)
    answer_loss = vqa_answer_loss(logits, answer_ids, pad_id)
    loss = (weights * answer_loss).sum() / image.shape[0]
    return {"question_states": states, "logits": logits, "answer_loss": answer_loss, "loss": loss}


def tile(x: Tensor, n: int) -> Tensor:
    """Official `tile(x, 0, n)`: `x.repeat(n, ...)` then rows `[i, B + i, 2B + i, ...]` for each i (each row n
    times, consecutively)."""
    rows = x.shape[0]
    order = torch.tensor([rows * j + i for i in range(rows) for j in range(n)])
    return x.repeat(n, *([1] * (x.dim() - 1))).index_select(0, order)


def vqa_rank_answer(
    sd: StateDict,
    question_states: Tensor,
    question_atts: Tensor,
    answer_ids: Tensor,
    answer_atts: Tensor,
    k: int,
    decoder_spec: TextSpec,
    official: bool = True,
    pad_id: int = 0,
) -> dict[str, Tensor]:
    """Official `model_vqa.rank_answer` (`official=False`: the score without the extra `log(prob_first)`).
    Returns the re-ranked candidate ids [B, k], their probabilities [B, k], the scores in that order [B, k] and the
    first-stage probabilities of every candidate [B, C]."""
    num_questions = question_states.shape[0]
    start = answer_ids[0, 0].repeat(num_questions, 1)
    first_logits = vqa_decoder_logits(sd, start, None, question_states, question_atts, decoder_spec)[:, 0, :]
    first_probs = F.softmax(first_logits, dim=1).index_select(1, answer_ids[:, 1])
    topk_probs, topk_ids = first_probs.topk(k, dim=1)
    ids = torch.cat([answer_ids.index_select(0, row) for row in topk_ids])
    atts = torch.cat([answer_atts.index_select(0, row) for row in topk_ids])
    logits = vqa_decoder_logits(sd, ids, atts, tile(question_states, k), tile(question_atts, k), decoder_spec)
    answer_loss = vqa_answer_loss(logits, ids, pad_id).view(ids.shape[0], -1)
    parts = [topk_probs.view(-1, 1).log(), -answer_loss] if official else [-answer_loss]
    scores = torch.cat(parts, dim=1).sum(1).view(num_questions, k)
    probs, rerank = F.softmax(scores, dim=-1).topk(k, dim=1)
    return {
        "candidate_indices": torch.gather(topk_ids, 1, rerank),
        "probabilities": probs,
        "scores": torch.gather(scores, 1, rerank),
        "first_probabilities": first_probs,
    }


# --------------------------------------------------------------------------------------------------------------
# Weakly supervised grounding (`Grounding.py::val`, gradcam_mode 'itm'; `dataset/utils.py::grounding_eval`)
# --------------------------------------------------------------------------------------------------------------


def gradcam_official(
    sd: StateDict,
    image_embeds: Tensor,
    input_ids: Tensor,
    text_atts: Tensor,
    spec: TextSpec,
    block_num: int,
    num_patches: int,
) -> Tensor:
    """`[B, n, n]` Grad-CAM maps: `xbert` saves the cross-attention probabilities of layer `block_num` (before
    dropout) with a hook on their gradient; `loss = itm_head(multi_modal[:, 0])[:, 1].sum()` is back-propagated;
    `cams = attn[:, :, :, 1:] * mask`, `grads = grad[:, :, :, 1:].clamp(min=0) * mask`, both reshaped to
    `[B, heads, L, n, n]`; `(cams * grads).mean(1).mean(1)` (padded positions count in the mean over L)."""
    p = text_prefix(sd) + "encoder.layer."
    x = bert_embeddings(sd, input_ids, spec)
    self_mask = (1.0 - text_atts[:, None, None, :].to(x.dtype)) * -10000.0
    image_embeds = image_embeds.detach().requires_grad_(True)
    cross_mask = torch.zeros(image_embeds.shape[0], 1, 1, image_embeds.shape[1])
    saved: dict[str, Tensor] = {}
    b, length, hidden = x.shape
    head_dim = hidden // spec.num_heads
    for layer in range(spec.num_layers):
        x = _bert_attention(sd, f"{p}{layer}.attention", x, x, self_mask, spec)
        if layer >= spec.fusion_layer:
            prefix = f"{p}{layer}.crossattention"
            q = _linear(sd, prefix + ".self.query", x).view(b, length, spec.num_heads, head_dim).transpose(1, 2)
            kv_len = image_embeds.shape[1]
            k = _linear(sd, prefix + ".self.key", image_embeds).view(b, kv_len, spec.num_heads, head_dim).transpose(1, 2)
            v = _linear(sd, prefix + ".self.value", image_embeds).view(b, kv_len, spec.num_heads, head_dim).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) / math.sqrt(head_dim) + cross_mask).softmax(dim=-1)
            if layer == block_num:
                probs.retain_grad()
                saved["attn"] = probs
            context = (probs @ v).transpose(1, 2).reshape(b, length, hidden)
            x = _layer_norm(sd, prefix + ".output.LayerNorm", _linear(sd, prefix + ".output.dense", context) + x, spec.eps)
        h = F.gelu(_linear(sd, f"{p}{layer}.intermediate.dense", x))
        x = _layer_norm(sd, f"{p}{layer}.output.LayerNorm", _linear(sd, f"{p}{layer}.output.dense", h) + x, spec.eps)
    mlp_head(sd, "itm_head", x[:, 0])[:, 1].sum().backward()
    attn = saved["attn"]
    mask = text_atts.view(b, 1, -1, 1, 1)
    cams = attn.detach()[:, :, :, 1:].reshape(b, spec.num_heads, -1, num_patches, num_patches) * mask
    grads = attn.grad[:, :, :, 1:].clamp(min=0).reshape(b, spec.num_heads, -1, num_patches, num_patches) * mask
    return (cams * grads).mean(1).mean(1)


def grounding_choose_official(cam: Tensor, dets: list[list[float]], height: int, width: int) -> tuple[list[float], Tensor]:
    """`grounding_eval` for one expression: bicubic up-sampling to `(height, width)`, each det `(x, y, w, h)` scored
    `mask[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** 0.5`, the first box beating a running maximum
    from 0. Returns (chosen det `[x, y, w, h]`, all scores)."""
    n = cam.shape[-1]
    mask = F.interpolate(cam.view(1, 1, n, n), size=(height, width), mode="bicubic").squeeze()
    max_score, pred_box, scores = 0, None, []
    for det in dets:
        score = mask[int(det[1]):int(det[1] + det[3]), int(det[0]):int(det[0] + det[2])].sum() / (det[2] * det[3]) ** 0.5
        scores.append(score)
        if score > max_score:
            pred_box, max_score = det[:4], score
    return pred_box, torch.stack(scores)


def compute_iou_official(box1: list[float], box2: list[float]) -> float:
    """`dataset/utils.py::computeIoU` of two `[x, y, w, h]` boxes (inclusive pixels, exclusive areas)."""
    inter_x1 = max(box1[0], box2[0])
    inter_y1 = max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1) if inter_x1 < inter_x2 and inter_y1 < inter_y2 else 0
    return float(inter) / (box1[2] * box1[3] + box2[2] * box2[3] - inter)
