"""Official-format X-VLM state dicts (exact key names and shapes, official-xvlm.md §3) for tests.

`official_key_shapes(arch, task)` enumerates the keys of the official `model_pretrain.XVLM`, `model_retrieval.XVLM`,
`model_bbox.XVLM`, `model_nlvr.XVLM` ("nlvr2"), `model_nlvr_pretrain.XVLM` ("nlvr2-pretrain"), `model_vqa.XVLM`
("vqa") or `model_captioning.XVLM` / `model_captioning_pretrain.XVLM` ("captioning") state dict;
`official_state_dict(...)` fills them with random values (buffers computed as the official modules do, tied MLM /
LM-head tensors and the NLVR2 cross-attention key/value pairs shared) or with meta tensors (base size without
allocating 800 MB). `official_nlvr2_loader(...)`, `official_vqa_loader(...)` and `official_captioning_loader(...)` are
the official NLVR2, VQA and captioning loaders' renaming of a pre-training state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from official_reference import relative_position_index, shift_attention_mask, stage_geometry


@dataclass
class OfficialArch:
    """Architecture knobs of the official code (task YAML + config_swinB_*.json + config_bert.json)."""

    image_res: int = 224
    patch: int = 4
    embed_dim: int = 128
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    window: int = 7
    vocab: int = 30522
    hidden: int = 768
    layers: int = 12
    fusion: int = 6
    text_heads: int = 12
    intermediate: int = 3072
    max_position: int = 512
    type_vocab: int = 2
    proj: int = 256

    @property
    def vision_width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


def base_arch(image_res: int = 224) -> OfficialArch:
    return OfficialArch(image_res=image_res, window={224: 7, 384: 12, 480: 15}[image_res])


def tiny_arch(**overrides) -> OfficialArch:
    """Swin 64px, patch 4, embed 8, depths [2, 2, 2] (shifted blocks with attn_mask in stages 0-1, stage 2 res =
    window), text width 24 != vision width 32, 4 layers with fusion from 2."""
    arch = OfficialArch(
        image_res=64,
        patch=4,
        embed_dim=8,
        depths=[2, 2, 2],
        num_heads=[2, 2, 4],
        window=4,
        vocab=54,
        hidden=24,
        layers=4,
        fusion=2,
        text_heads=2,
        intermediate=48,
        max_position=40,
        proj=16,
    )
    for name, value in overrides.items():
        setattr(arch, name, value)
    return arch


def _swin_shapes(arch: OfficialArch) -> dict[str, tuple[tuple[int, ...], str]]:
    p = "vision_encoder."
    out: dict[str, tuple[tuple[int, ...], str]] = {
        p + "patch_embed.proj.weight": ((arch.embed_dim, 3, arch.patch, arch.patch), "param"),
        p + "patch_embed.proj.bias": ((arch.embed_dim,), "bias"),
        p + "patch_embed.norm.weight": ((arch.embed_dim,), "ln_weight"),
        p + "patch_embed.norm.bias": ((arch.embed_dim,), "bias"),
    }
    geometry = stage_geometry(arch.image_res, arch.patch, arch.depths, arch.window)
    for i, depth in enumerate(arch.depths):
        c = arch.embed_dim * 2**i
        heads = arch.num_heads[i]
        res, w, shift = geometry[i]
        for j in range(depth):
            b = f"{p}layers.{i}.blocks.{j}."
            out[b + "norm1.weight"] = ((c,), "ln_weight")
            out[b + "norm1.bias"] = ((c,), "bias")
            out[b + "attn.relative_position_bias_table"] = (((2 * w - 1) ** 2, heads), "table")
            out[b + "attn.relative_position_index"] = ((w * w, w * w), f"index:{w}")
            out[b + "attn.qkv.weight"] = ((3 * c, c), "param")
            out[b + "attn.qkv.bias"] = ((3 * c,), "bias")
            out[b + "attn.proj.weight"] = ((c, c), "param")
            out[b + "attn.proj.bias"] = ((c,), "bias")
            out[b + "norm2.weight"] = ((c,), "ln_weight")
            out[b + "norm2.bias"] = ((c,), "bias")
            out[b + "mlp.fc1.weight"] = ((4 * c, c), "param")
            out[b + "mlp.fc1.bias"] = ((4 * c,), "bias")
            out[b + "mlp.fc2.weight"] = ((c, 4 * c), "param")
            out[b + "mlp.fc2.bias"] = ((c,), "bias")
            if j % 2 == 1 and shift > 0:
                out[b + "attn_mask"] = (((res // w) ** 2, w * w, w * w), f"mask:{res}:{w}:{shift}")
        if i < len(arch.depths) - 1:
            d = f"{p}layers.{i}.downsample."
            out[d + "reduction.weight"] = ((2 * c, 4 * c), "param")
            out[d + "norm.weight"] = ((4 * c,), "ln_weight")
            out[d + "norm.bias"] = ((4 * c,), "bias")
    out[p + "norm.weight"] = ((arch.vision_width,), "ln_weight")
    out[p + "norm.bias"] = ((arch.vision_width,), "bias")
    return out


def nlvr2_layers(arch: OfficialArch) -> int:
    """The official NLVR2 text stack: `fusion + 2 * (layers - fusion)` layers."""
    return arch.fusion + 2 * (arch.layers - arch.fusion)


def vqa_decoder_layers(arch: OfficialArch) -> int:
    """The official VQA answer decoder: `num_dec_layers` = the number of fusion layers (asserted)."""
    return arch.layers - arch.fusion


def _bert_shapes(
    arch: OfficialArch,
    prefix: str,
    layers: int | None = None,
    fusion: int | None = None,
    cross_width: int | None = None,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """xbert keys under `prefix`: crossattention from layer `fusion` (default `arch.fusion`) on, its key/value
    reading `cross_width` features (default the vision width)."""
    h = arch.hidden
    fusion = arch.fusion if fusion is None else fusion
    cross_width = arch.vision_width if cross_width is None else cross_width
    out: dict[str, tuple[tuple[int, ...], str]] = {
        prefix + "embeddings.position_ids": ((1, arch.max_position), "position_ids"),
        prefix + "embeddings.word_embeddings.weight": ((arch.vocab, h), "embedding"),
        prefix + "embeddings.position_embeddings.weight": ((arch.max_position, h), "embedding"),
        prefix + "embeddings.token_type_embeddings.weight": ((arch.type_vocab, h), "embedding"),
        prefix + "embeddings.LayerNorm.weight": ((h,), "ln_weight"),
        prefix + "embeddings.LayerNorm.bias": ((h,), "bias"),
    }
    for layer in range(arch.layers if layers is None else layers):
        base = f"{prefix}encoder.layer.{layer}."
        blocks = ["attention"] + (["crossattention"] if layer >= fusion else [])
        for block in blocks:
            kv = cross_width if block == "crossattention" else h
            for name, width in (("query", h), ("key", kv), ("value", kv)):
                out[f"{base}{block}.self.{name}.weight"] = ((h, width), "param")
                out[f"{base}{block}.self.{name}.bias"] = ((h,), "bias")
            out[f"{base}{block}.output.dense.weight"] = ((h, h), "param")
            out[f"{base}{block}.output.dense.bias"] = ((h,), "bias")
            out[f"{base}{block}.output.LayerNorm.weight"] = ((h,), "ln_weight")
            out[f"{base}{block}.output.LayerNorm.bias"] = ((h,), "bias")
        out[base + "intermediate.dense.weight"] = ((arch.intermediate, h), "param")
        out[base + "intermediate.dense.bias"] = ((arch.intermediate,), "bias")
        out[base + "output.dense.weight"] = ((h, arch.intermediate), "param")
        out[base + "output.dense.bias"] = ((h,), "bias")
        out[base + "output.LayerNorm.weight"] = ((h,), "ln_weight")
        out[base + "output.LayerNorm.bias"] = ((h,), "bias")
    # Official layer order: attention, crossattention, intermediate, output (dict order is cosmetic only).
    return out


def _mlp_shapes(prefix: str, hidden: int, out_dim: int) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        f"{prefix}.0.weight": ((2 * hidden, hidden), "param"),
        f"{prefix}.0.bias": ((2 * hidden,), "bias"),
        f"{prefix}.1.weight": ((2 * hidden,), "ln_weight"),
        f"{prefix}.1.bias": ((2 * hidden,), "bias"),
        f"{prefix}.3.weight": ((out_dim, 2 * hidden), "param"),
        f"{prefix}.3.bias": ((out_dim,), "bias"),
    }


def _lm_head_shapes(arch: OfficialArch, prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """`BertOnlyMLMHead` keys `{prefix}cls.predictions.*` (decoder weight / bias: tied aliases)."""
    h = arch.hidden
    p = prefix + "cls.predictions."
    return {
        p + "bias": ((arch.vocab,), "mlm_bias"),
        p + "transform.dense.weight": ((h, h), "param"),
        p + "transform.dense.bias": ((h,), "bias"),
        p + "transform.LayerNorm.weight": ((h,), "ln_weight"),
        p + "transform.LayerNorm.bias": ((h,), "bias"),
        p + "decoder.weight": ((arch.vocab, h), "tied_decoder"),
        p + "decoder.bias": ((arch.vocab,), "tied_bias"),
    }


# Tied LM heads: `cls.predictions` prefix -> the BERT whose word embeddings its decoder weight is.
_TIED_HEADS = {
    "pretrain": {"text_encoder.": "text_encoder.bert."},
    "vqa": {"text_decoder.": "text_decoder.bert."},
    "captioning": {"text_decoder.": "text_decoder.bert."},
}


def official_key_shapes(arch: OfficialArch, task: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, kind) of the official state dict of `task` ("pretrain", "retrieval", "grounding", "nlvr2",
    "nlvr2-pretrain", "vqa", "captioning")."""
    out = _swin_shapes(arch)
    if task == "pretrain":
        out.update(_bert_shapes(arch, "text_encoder.bert."))
        out.update(_lm_head_shapes(arch, "text_encoder."))
    elif task == "vqa":
        # model_vqa.py: the whole encoder stack, then a BertLMHeadModel decoder whose every layer cross-attends to
        # the question states (width = text width).
        out.update(_bert_shapes(arch, "text_encoder."))
        out.update(
            _bert_shapes(arch, "text_decoder.bert.", vqa_decoder_layers(arch), fusion=0, cross_width=arch.hidden)
        )
        out.update(_lm_head_shapes(arch, "text_decoder."))
    elif task == "captioning":
        # model_captioning.py: text_encoder = None; a BertLMHeadModel on the encoder's config (cross-attention from
        # fusion_layer on, reading the image) with its tied LM head.
        out.update(_bert_shapes(arch, "text_decoder.bert."))
        out.update(_lm_head_shapes(arch, "text_decoder."))
    elif task in ("nlvr2", "nlvr2-pretrain"):
        out.update(_bert_shapes(arch, "text_encoder.", nlvr2_layers(arch)))
    else:
        out.update(_bert_shapes(arch, "text_encoder."))
    if task == "nlvr2":
        out.update(_mlp_shapes("cls_head", arch.hidden, 2))
    if task == "nlvr2-pretrain":
        out.update(
            {
                "vision_proj.weight": ((arch.proj, arch.vision_width), "param"),
                "vision_proj.bias": ((arch.proj,), "bias"),
                "ta_head.weight": ((3, arch.hidden), "param"),
                "ta_head.bias": ((3,), "bias"),
            }
        )
    if task in ("pretrain", "retrieval"):
        out.update(
            {
                "vision_proj.weight": ((arch.proj, arch.vision_width), "param"),
                "vision_proj.bias": ((arch.proj,), "bias"),
                "text_proj.weight": ((arch.proj, arch.hidden), "param"),
                "text_proj.bias": ((arch.proj,), "bias"),
                "temp": ((), "temp"),
            }
        )
        out.update(_mlp_shapes("itm_head", arch.hidden, 2))
    if task in ("pretrain", "grounding"):
        out.update(_mlp_shapes("bbox_head", arch.hidden, 4))
    return out


def official_state_dict(arch: OfficialArch, task: str, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random official-format state dict (or meta tensors with `device="meta"`); buffers and tied tensors as the
    official modules produce them."""
    shapes = official_key_shapes(arch, task)
    generator = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, (shape, kind) in shapes.items():
        if device == "meta":
            dtype = torch.int64 if kind.startswith(("index", "position_ids")) else torch.float32
            sd[key] = torch.empty(shape, dtype=dtype, device="meta")
            continue
        if kind == "param":
            fan_in = shape[1] * (math.prod(shape[2:]) if len(shape) > 2 else 1)
            sd[key] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        elif kind in ("bias", "mlm_bias"):
            sd[key] = 0.1 * torch.randn(shape, generator=generator)
        elif kind == "ln_weight":
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif kind == "embedding":
            sd[key] = 0.5 * torch.randn(shape, generator=generator)
        elif kind == "table":
            sd[key] = 0.5 * torch.randn(shape, generator=generator)
        elif kind == "temp":
            sd[key] = torch.tensor(0.05)
        elif kind.startswith("index:"):
            sd[key] = relative_position_index(int(kind.split(":")[1]))
        elif kind.startswith("mask:"):
            _, res, w, shift = kind.split(":")
            sd[key] = shift_attention_mask(int(res), int(w), int(shift))
        elif kind == "position_ids":
            sd[key] = torch.arange(shape[1]).unsqueeze(0)
        elif kind in ("tied_decoder", "tied_bias"):
            continue
        else:  # pragma: no cover
            raise AssertionError(kind)
    if task in _TIED_HEADS and device != "meta":
        for head, bert in _TIED_HEADS[task].items():
            sd[head + "cls.predictions.decoder.weight"] = sd[bert + "embeddings.word_embeddings.weight"]
            sd[head + "cls.predictions.decoder.bias"] = sd[head + "cls.predictions.bias"]
        sd = {k: sd[k] for k in shapes}  # official key order
    if task in ("nlvr2", "nlvr2-pretrain"):
        for even, odd in shared_cross_attention_keys(arch):
            sd[even] = sd[odd]  # official share_cross_attention: the even layer gets the odd layer's Parameter
    return sd


def shared_cross_attention_keys(arch: OfficialArch, prefix: str = "text_encoder.") -> list[tuple[str, str]]:
    """`(layer fusion+2k key, layer fusion+2k+1 key)` of every key/value weight and bias the official
    `share_cross_attention` ties (24 pairs at base size)."""
    pairs = []
    for layer in range(arch.fusion, nlvr2_layers(arch), 2):
        for name in ("key", "value"):
            for kind in ("weight", "bias"):
                tail = f"crossattention.self.{name}.{kind}"
                pairs.append((f"{prefix}encoder.layer.{layer}.{tail}", f"{prefix}encoder.layer.{layer + 1}.{tail}"))
    return pairs


def official_nlvr2_loader(pretrain_sd: dict[str, torch.Tensor], fusion: int) -> dict[str, torch.Tensor]:
    """The text-encoder part of the official NLVR2 loader with `load_nlvr_pretrain=False` (`model_nlvr.py`
    `load_pretrained`; the same in `model_nlvr_pretrain.py`): every `text_encoder.` key containing `bert.` loses
    `bert.`; the layer number is split index 3 of the new key; layers `>= fusion` go to `(N - fusion) * 2 + fusion`
    and that `+ 1`; the other keys (vision, heads, `text_encoder.cls.*`) stay as they are."""
    state = dict(pretrain_sd)
    for key in list(state):
        if "text_encoder." in key and "bert." in key:
            new_key = key.replace("bert.", "")
            if "layer." in new_key:
                parts = new_key.split(".")
                layer = int(parts[3])
                if layer >= fusion:
                    first = (layer - fusion) * 2 + fusion
                    for target in (first, first + 1):
                        parts[3] = str(target)
                        state[".".join(parts)] = state[key]
                else:
                    state[new_key] = state[key]
            else:
                state[new_key] = state[key]
            del state[key]
    return state


def official_vqa_loader(pretrain_sd: dict[str, torch.Tensor], fusion: int, resized: bool) -> dict[str, torch.Tensor]:
    """The text part of the official VQA loader on a pre-training state dict (`model_vqa.py` `load_pretrained`,
    `load_text=False`), in its order of operations over a snapshot of the keys: a key containing `bert.` is also
    stored without it (the original stays); then every `text_encoder.` key is removed and, unless it is a layer
    `< fusion` or (`resized`: decoder width != vision width) a cross-attention key/value, stored under
    `text_decoder.` with layer `N` renumbered `N - fusion` (the layer number is split index 4 of the key)."""
    state = dict(pretrain_sd)
    for key in list(state):
        if "bert." in key:
            state[key.replace("bert.", "")] = state[key]
        if "text_encoder." not in key:
            continue
        new_key = key
        if "layer." in key:
            parts = key.split(".")
            layer = int(parts[4])
            cross_kv = "crossattention.self.key" in key or "crossattention.self.value" in key
            if layer < fusion or (resized and cross_kv):
                del state[key]
                continue
            parts[4] = str(layer - fusion)
            new_key = ".".join(parts)
        state[new_key.replace("text_encoder", "text_decoder")] = state[key]
        del state[key]
    return state


def official_captioning_loader(pretrain_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text part of the official captioning loader on a pre-training state dict (`model_captioning.py` /
    `model_captioning_pretrain.py` `load_pretrained`, `load_text=False`, `load_capt_pretrain=False`): every key
    starting with `text_encoder.` is stored under `text_decoder.` instead (`text_encoder.bert.X` ->
    `text_decoder.bert.X`, `text_encoder.cls.X` -> `text_decoder.cls.X`); the other keys stay."""
    state = dict(pretrain_sd)
    for key in list(state):
        if key.startswith("text_encoder."):
            state[key.replace("text_encoder.", "text_decoder.")] = state[key]
            del state[key]
    return state


def official_task_files(tmp_path, arch: OfficialArch, name: str = "Tiny.yaml", extra: str = "") -> str:
    """Write an official-style task YAML + vision/text JSONs for `arch` (JSONs in `configs/` relative to the YAML's
    parent, as in the official repository); `extra` is appended to the YAML (e.g. `num_dec_layers: 2`). Returns the
    YAML path."""
    import json

    configs = tmp_path / "configs"
    configs.mkdir(exist_ok=True)
    (configs / "config_swin_tiny.json").write_text(
        json.dumps(
            {
                "ckpt": "data/unused.pth",
                "vision_width": arch.vision_width,
                "image_res": arch.image_res,
                "window_size": arch.window,
                "embed_dim": arch.embed_dim,
                "depths": arch.depths,
                "num_heads": arch.num_heads,
            }
        )
    )
    (configs / "config_bert_tiny.json").write_text(
        json.dumps(
            {
                "architectures": ["BertForMaskedLM"],
                "attention_probs_dropout_prob": 0.1,
                "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1,
                "hidden_size": arch.hidden,
                "initializer_range": 0.02,
                "intermediate_size": arch.intermediate,
                "layer_norm_eps": 1e-12,
                "max_position_embeddings": arch.max_position,
                "model_type": "bert",
                "num_attention_heads": arch.text_heads,
                "num_hidden_layers": arch.layers,
                "pad_token_id": 0,
                "type_vocab_size": arch.type_vocab,
                "vocab_size": arch.vocab,
                "fusion_layer": arch.fusion,
                "encoder_width": 1024,
            }
        )
    )
    yaml_path = configs / name
    yaml_path.write_text(
        "## Vision Encoder\n"
        "vision_config: 'configs/config_swin_tiny.json'\n"
        "use_clip_vit: False\n"
        "use_swin: True\n"
        f"image_res: {arch.image_res}\n"
        "patch_size: 32\n\n"
        "## Text Encoder\n"
        "use_roberta: False\n"
        "text_config: 'configs/config_bert_tiny.json'  # ['configs/config_bert.json', 'configs/config_roberta.json']\n"
        "text_encoder: 'data/bert-base-uncased'\n\n"
        f"embed_dim: {arch.proj}\n"
        "temp: 0.07\n"
        "optimizer: {opt: adamW, lr: 3e-5, weight_decay: 0.01, lr_mult: 2}\n" + extra
    )
    return str(yaml_path)


def sequence_diffs(name: str, reference: torch.Tensor, ours: torch.Tensor, mask: torch.Tensor,
                   padding_free: bool = True) -> dict[str, float]:
    """Max |difference| of text-stack states `(batch, L, hidden)` against the official ones: every position, or
    with `padding_free` (the model's default) the real tokens of `mask`, plus the padded positions' largest value
    (those are 0 there; the official code computes values that nothing reads)."""
    if not padding_free:
        return {name: (reference - ours).abs().max().item()}
    real = mask.bool()
    return {
        name: (reference[real] - ours[real]).abs().max().item(),
        f"{name}_padded_positions": ours[~real].abs().max().item(),
    }
