"""Reading safetensors checkpoints with errors that name the file and the tensor. Pickles are refused."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from alora.errors import AloraError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(AloraError, ValueError):
    """A checkpoint file is missing, corrupt, a pickle, or lacks a tensor."""


def refuse_pickles(folder: Path, what: str) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: {what} has only pickle checkpoints ({', '.join(pickles)}); they are refused because "
            "unpickling can run arbitrary code. Convert them to safetensors."
        )


class SafetensorsIndex:
    """Tensor name -> file over one or more safetensors files; tensors are read on demand."""

    def __init__(self, files: list[Path]):
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
            self._handles[path] = handle
            for key in handle.keys():
                self._file_of[key] = path

    @classmethod
    def of_model_folder(cls, folder: Path) -> "SafetensorsIndex":
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            refuse_pickles(folder, "the model folder")
            raise CheckpointError(f"{folder}: no *.safetensors weights found")
        return cls(files)

    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, key: str) -> torch.Tensor:
        path = self._file_of.get(key)
        if path is None:
            raise CheckpointError(f"tensor {key!r} is missing from {', '.join(sorted(map(str, set(self._handles))))}")
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {key!r} could not be read ({e})") from e
