"""Lazy reads of a safetensors checkpoint: one `model.safetensors` or shards with an index.

Only the tensors asked for are read (files are memory-mapped by `safe_open`), and one expert of a
packed 3-D expert tensor is read as a slice, so a worker touches only its experts' bytes.
FP8 weights stored with a `<name>_scale_inv` companion (DeepSeek-V3 format, 128x128 blocks) are
dequantized by `load` and returned raw by `load_fp8`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from moe_core.errors import ModelNotFoundError, UnsupportedModelError
from moe_core.fp8 import FP8_DTYPE, dequantize_weight, num_blocks

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"


class Checkpoint:
    """Tensor names -> lazily opened safetensors files of one model folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelNotFoundError(f"model folder {self.path} does not exist")
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UnsupportedModelError(f"{index} has no readable weight_map: {err}") from err
            self._files = {name: self.path / file for name, file in weight_map.items()}
            for file in sorted(set(self._files.values())):
                if not file.is_file():
                    raise ModelNotFoundError(f"shard {file} named by {index} does not exist")
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self._files = dict.fromkeys(f.keys(), single)
        else:
            raise ModelNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}")
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return sorted(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def is_fp8(self, name: str) -> bool:
        """True when name is stored as float8_e4m3fn with a `<name>_scale_inv` companion."""
        return self.has(name + SCALE_SUFFIX) and self._slice(name).get_dtype() == "F8_E4M3"

    def load(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor as float32 (FP8 dequantized); index: one entry of the first dimension."""
        fp8 = self.load_fp8(name, index)
        if fp8 is not None:
            return dequantize_weight(*fp8)
        return self._read(name, index).float()

    def load_fp8(
        self, name: str, index: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w8 [N, K] float8_e4m3fn, scales [ceil(N/128), ceil(K/128)] float32), or None when
        the tensor is not stored as FP8."""
        if not self.is_fp8(name):
            return None
        w8 = self._read(name, index)
        scales = self._read(name + SCALE_SUFFIX, index).float()
        if w8.dtype != FP8_DTYPE or w8.dim() != 2:
            raise UnsupportedModelError(
                f"{name}: FP8 weights must be 2-D float8_e4m3fn, got {tuple(w8.shape)} {w8.dtype}"
            )
        expected = (num_blocks(w8.shape[0]), num_blocks(w8.shape[1]))
        if tuple(scales.shape) != expected:
            raise UnsupportedModelError(
                f"{name}{SCALE_SUFFIX} has shape {tuple(scales.shape)}, a weight of shape "
                f"{tuple(w8.shape)} needs {expected} (128x128 blocks)"
            )
        return w8, scales

    def _read(self, name: str, index: int | None) -> torch.Tensor:
        if index is None:
            return self._handle(name).get_tensor(name)
        shape = self.shape(name)
        if not shape or not 0 <= index < shape[0]:
            raise UnsupportedModelError(f"{name} of shape {shape} has no entry {index}")
        return self._slice(name)[index]

    def _slice(self, name: str):
        return self._handle(name).get_slice(name)

    def _handle(self, name: str):
        file = self._files.get(name)
        if file is None:
            raise ModelNotFoundError(f"tensor {name} is not in the checkpoint at {self.path}")
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(file, framework="pt")  # memory-mapped; kept open for reuse
            self._handles[file] = handle
        return handle
