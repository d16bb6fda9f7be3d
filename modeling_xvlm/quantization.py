"""Int8 dynamic quantization for CPU inference (torch's own `torch.ao.quantization.quantize_dynamic`).

`quantize_int8(model)` replaces every `nn.Linear` of the text stack (the text and fusion layers, `text_model`) and of
the answer / caption decoder (`text_decoder`) with torch's dynamically quantized linear layer: int8 weights (one
scale per tensor), activations quantized per batch at run time, int32 accumulation. The image encoder (Swin), the
embeddings and the small heads (ITM, box, classifier) stay fp32. What that costs in agreement with the fp32 model,
and what it buys in speed, is measured in docs/benchmarks.md.

A quantized model is for inference on the CPU only: it cannot be trained, moved to a GPU or saved (its weights are
packed int8 tensors); save the fp32 model and quantize it after loading.

torch 2.13 marks its eager-mode quantization deprecated (in favour of the separate torchao package) but ships it
unchanged; `quantize_int8` silences those two warnings and says clearly if a future torch no longer has it.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

__all__ = ["INT8_SUBMODULES", "is_int8_quantized", "quantize_int8"]

#: The submodules whose `nn.Linear` layers are quantized (names of attributes, wherever they are in the model).
INT8_SUBMODULES = ("text_model", "text_decoder")

_FLAG = "_xvlm_int8_quantized"


def is_int8_quantized(model: nn.Module) -> bool:
    """Whether `model` was returned by `quantize_int8`."""
    return bool(getattr(model, _FLAG, False))


def quantize_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Int8 dynamic quantization of the text, fusion and decoder linear layers of an X-VLM model, for CPU inference.

    Args:
        model: any X-VLM model (`XVLMModel` or a head) on the CPU, in fp32.
        inplace: quantize `model` itself (default: a quantized copy; `model` is left unchanged).

    Returns:
        The quantized model, in eval mode. Its outputs have the fp32 model's shapes and dtypes.

    Raises:
        ValueError: the model is not on the CPU, is not fp32, has no text stack or decoder, or is quantized already.
    """
    if is_int8_quantized(model):
        raise ValueError("this model is int8-quantized already (quantize_int8 was applied to it).")
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu":
        where = "no parameters" if parameter is None else f"parameters on {parameter.device}"
        raise ValueError(f"int8 dynamic quantization runs on the CPU only; this model has {where} (use model.cpu()).")
    if parameter.dtype != torch.float32:
        raise ValueError(f"quantize_int8 needs an fp32 model, got {parameter.dtype} (use model.float()).")
    targets = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in INT8_SUBMODULES]
    # outermost only: a caption decoder's `text_decoder.text_model` is quantized with its `text_decoder`
    targets = [name for name in targets if not any(name.startswith(outer + ".") for outer in targets)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no {' or '.join(INT8_SUBMODULES)} to quantize.")
    quantized = model if inplace else copy.deepcopy(model)
    quantized.eval()
    for name in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        submodule = getattr(parent, attribute)
        setattr(parent, attribute, _quantize_dynamic(submodule))
    setattr(quantized, _FLAG, True)
    return quantized


def _quantize_dynamic(module: nn.Module) -> nn.Module:
    """`torch.ao.quantization.quantize_dynamic` of the `nn.Linear` layers of `module` (qint8), without torch's
    deprecation warnings."""
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None:
        raise RuntimeError(
            f"this torch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic, which quantize_int8 uses."
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*", category=UserWarning)
        return quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
