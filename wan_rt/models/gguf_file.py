"""GGUF checkpoint files (city96's ComfyUI-GGUF Wan experts), read with the `gguf` package.

Everything stays memory-mapped, as safetensors files do. Float tensors (F32, F16, BF16) come
back as torch tensors. Quantized ones come back as
`QuantizedWeight`: the raw blocks, their GGML type and the tensor's logical shape, dequantized on
request with `gguf.quants.dequantize`. Names are as stored (original Wan names in city96's files).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch
from torch import Tensor

from wan_rt.models.checkpoint import CheckpointError, _one_line

_FLOAT_TYPES = ("F32", "F16", "BF16")
# Block types gguf's Python code dequantizes (the llama.cpp "legacy" and K-quants).
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


@dataclass(frozen=True)
class QuantizedWeight:
    """One GGUF-quantized tensor: `data` uint8 [rows, bytes per row] as stored, `qtype` its
    GGMLQuantizationType name, `shape` the torch shape it dequantizes to."""

    data: Tensor
    qtype: str
    shape: torch.Size

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None) -> Tensor:
        """On the blocks' device with torch where gguf_dequant has the type, else gguf's numpy."""
        from wan_rt.models.gguf_dequant import TORCH_DEQUANTIZE

        if self.qtype in TORCH_DEQUANTIZE:
            blocks = self.data.reshape(-1, _block_bytes(self.qtype))
            values = TORCH_DEQUANTIZE[self.qtype](blocks)
        else:
            import gguf

            values = torch.from_numpy(gguf.quants.dequantize(self.data.cpu().numpy(),
                                                             gguf.GGMLQuantizationType[self.qtype]))
        return values.reshape(self.shape).to(device=device or self.data.device, dtype=dtype)


GGUFTensor = Union[Tensor, QuantizedWeight]


def _block_bytes(qtype: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]


def read_gguf(path: Union[str, Path]) -> dict[str, GGUFTensor]:
    """Every tensor of a .gguf file; a file gguf cannot parse, or a tensor type wan_rt cannot
    dequantize, is one CheckpointError naming the file (and the tensor)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # truncated file, bad magic, unknown version
        raise CheckpointError(f"{path}: cannot read GGUF: {_one_line(e)}") from e
    with warnings.catch_warnings():
        # torch warns that the map is read-only; nothing writes to checkpoint tensors (casts copy).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _tensors(path, reader)


def _tensors(path: Path, reader) -> dict[str, GGUFTensor]:
    out: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        shape = torch.Size(int(d) for d in reversed(t.shape.tolist()))  # GGML lists dims fastest-first
        # GGML has at most 4 dims: city96's converter stores a 5-D tensor (the patch-embedding
        # conv) flattened, with its shape in this field.
        original = reader.fields.get(f"comfy.gguf.orig_shape.{t.name}")
        if original is not None:
            shape = torch.Size(int(d) for d in original.contents())
        data = t.data  # a view of the file's read-only memory map: pages are read when used
        if kind == "BF16":
            out[t.name] = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(shape)
        elif kind in _FLOAT_TYPES:
            out[t.name] = torch.from_numpy(data).reshape(shape)
        elif kind in QUANT_TYPES:
            out[t.name] = QuantizedWeight(torch.from_numpy(data.view(np.uint8)), kind, shape)
        else:
            raise CheckpointError(f"{path}: tensor {t.name} has GGML type {kind}, which wan_rt cannot dequantize "
                                  f"(supported: {', '.join(_FLOAT_TYPES + QUANT_TYPES)})")
    return out


def dequantize_all(sd: Mapping[str, GGUFTensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Quantized tensors as `dtype`; float tensors unchanged."""
    return {k: v.dequantize(dtype) if isinstance(v, QuantizedWeight) else v for k, v in sd.items()}
