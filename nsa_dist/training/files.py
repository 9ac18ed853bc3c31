"""Reading and writing a run's files: plain data only, never half written, and a damaged file named.

`load_file` is `torch.load(weights_only=True)` with errors that name the file; `save_atomically` writes
beside the target and renames. Checkpoints (nsa_dist.training.checkpoint), the engines' optimizer files
(nsa_dist.training.engine) and `final.pt` all go through here.

Every file written here carries its SHA-256 in a sidecar, `<file>.sha256` (the format of `sha256sum`,
so `sha256sum -c final.pt.sha256` checks it too), hashed while the bytes are written; `load_file`
checks it before unpickling, so a flipped byte inside a tensor is named instead of loaded. The check
reads the file once more: about 0.85 s per GiB on two CPU cores (docs/reliability.md, "Digests").
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DIGEST_SUFFIX = ".sha256"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, unsafe, or written by another config."""


class UnsafeCheckpointError(CheckpointError):
    pass


class DamagedCheckpointError(CheckpointError):
    pass


class WriteFailed(OSError):
    """A run's file could not be written; the message names the file and the fix."""

    def __str__(self) -> str:
        return self.strerror


# Plain-data classes DeepSpeed's optimizer files pickle (its ZeRO partitions' bookkeeping); allowed for the
# files under deepspeed/ only, beside what weights_only=True allows everywhere.
_DEEPSPEED_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))


def deepspeed_globals() -> list:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_GLOBALS]


def digest_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + DIGEST_SUFFIX)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_digest(path: Path, digest: str | None = None) -> None:
    """Write `path`'s sidecar (hashing the file unless `digest` is given), atomically."""
    path = Path(path)
    sidecar = digest_path(path)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(f"{digest or file_digest(path)}  {path.name}\n")
    os.replace(tmp, sidecar)


def check_digest(path: Path) -> None:
    """Raise DamagedCheckpointError when `path` does not hash to its sidecar's digest; a file without a
    sidecar (written before digests were kept) is read with a warning."""
    path = Path(path)
    sidecar = digest_path(path)
    if not sidecar.is_file():
        if path.is_file():
            log.warning("%s has no %s digest beside it (written by an older nsa_dist): not checked", path,
                        DIGEST_SUFFIX)
        return
    expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
    actual = file_digest(path)
    if actual != expected:
        raise DamagedCheckpointError(
            f"{path} is damaged: its SHA-256 is {actual[:12]}..., not the {expected[:12] or '(empty)'}... "
            f"written beside it at save ({sidecar.name}); use another checkpoint or retrain")


def load_file(path: Path, *, map_location: str = "cpu", mmap: bool = False, allowed: list = (),
              verify: bool = True) -> Any:
    """`torch.load(path, weights_only=True)` after checking the file's digest, naming the file when it is
    refused or cannot be read. `verify=False` skips the digest (a file checked a moment ago)."""
    path = Path(path)
    try:
        if verify:
            check_digest(path)
        if path.is_file() and not zipfile.is_zipfile(path):
            raise DamagedCheckpointError(f"{path} is damaged, truncated or not a file torch.save wrote (it has no "
                                         "zip directory)")
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(Unsupported global: [^\n]*?)(?: was not|\.?\n|$)", str(e))
        reason = found.group(1) if found else str(e).strip().splitlines()[0]
        raise UnsafeCheckpointError(f"{path} holds more than tensors and plain values ({reason}); refused unread: "
                                    "delete that checkpoint, or start fresh with trainer.move_old_run=true") from e
    except FileNotFoundError as e:
        raise DamagedCheckpointError(f"{path} is missing") from e
    except IsADirectoryError as e:
        raise DamagedCheckpointError(f"{path} is a directory, not a file") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpointError(f"{path} is damaged or truncated ({reason})") from e


class _HashingWriter:
    """A file object that hashes what passes through it, so that the digest costs no second read."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_atomically(state: Any, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename, so `path` is never half written; its digest
    goes beside it. A failed write (a full disk) leaves nothing behind and raises naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        write_digest(path, writer.sha.hexdigest())
    except BaseException as e:  # a Ctrl-C mid-write too: no .tmp is left behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise WriteFailed(e.errno if isinstance(e, OSError) and e.errno else errno.EIO,
                              _write_failure(path, e)) from e
        raise


def _write_failure(path: Path, error: BaseException) -> str:
    text = str(error)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) \
            or "No space left" in text or "file write failed" in text:
        return (f"could not write {path}: the disk is full ({error.strerror if isinstance(error, OSError) else 'write failed'}); "
                "nothing half-written was left: free space, or point the run at another disk (hydra.run.dir, "
                "trainer.checkpoint_dir)")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else text.strip().splitlines()[0]
    return f"could not write {path} ({reason}): check the disk and the directory's permissions"
