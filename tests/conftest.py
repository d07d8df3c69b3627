"""Session fixtures: tiny HF checkpoints built once, the HF references, and our model on them."""

from __future__ import annotations

from pathlib import Path

import hf_models
import pytest
import torch


class Checkpoints:
    """Tiny checkpoints, built on first use into one session folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._hf: dict[Path, object] = {}

    def get(self, name: str, packed: bool = False) -> Path:
        path = self.root / f"{name}-{'packed' if packed else 'per-expert'}"
        if not path.exists():
            hf_models.build_model(name, path, packed=packed)
        return path

    def fp8(self) -> Path:
        """DeepSeek-V3 FP8 checkpoint (partial edge blocks) made by our converter."""
        path = self.root / "deepseek_v3-fp8"
        if not path.exists():
            hf_models.write_deepseek_fp8_checkpoint(self.get("deepseek_v3_fp8src"), path)
        return path

    def fp8_dequantized(self) -> Path:
        """The float32 model the FP8 checkpoint stands for: the HF reference's input."""
        path = self.root / "deepseek_v3-fp8-dequantized"
        if not path.exists():
            hf_models.write_dequantized_checkpoint(self.fp8(), path)
        return path

    def hf(self, path: Path):
        """The HF float32 eager model of a folder, loaded once."""
        if path not in self._hf:
            self._hf[path] = hf_models.load_hf(path)
        return self._hf[path]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture
def single_thread():
    """Bit-reproducible float32 references: one intra-op thread while the test runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
