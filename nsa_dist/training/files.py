"""Reading and writing a run's files: plain data only, never half written, and a damaged file named.

`load_file` is `torch.load(weights_only=True)` with errors that name the file; `save_atomically` writes
beside the target and renames. Checkpoints (nsa_dist.training.checkpoint), the engines' optimizer files
(nsa_dist.training.engine) and `final.pt` all go through here.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, unsafe, or written by another config."""


class UnsafeCheckpointError(CheckpointError):
    pass


class DamagedCheckpointError(CheckpointError):
    pass


# Plain-data classes DeepSpeed's optimizer files pickle (its ZeRO partitions' bookkeeping); allowed for the
# files under deepspeed/ only, beside what weights_only=True allows everywhere.
_DEEPSPEED_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))


def deepspeed_globals() -> list:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_GLOBALS]


def load_file(path: Path, *, map_location: str = "cpu", mmap: bool = False, allowed: list = ()) -> Any:
    """`torch.load(path, weights_only=True)`, naming the file when it is refused or cannot be read."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(Unsupported global: [^\n]*?)(?: was not|\.?\n|$)", str(e))
        reason = found.group(1) if found else str(e).strip().splitlines()[0]
        raise UnsafeCheckpointError(f"{path} holds more than tensors and plain values ({reason}); refused unread: "
                                    "delete that checkpoint or set trainer.resume=never") from e
    except FileNotFoundError as e:
        raise DamagedCheckpointError(f"{path} is missing") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpointError(f"{path} is damaged or truncated ({reason})") from e


def save_atomically(state: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename, so `path` is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
