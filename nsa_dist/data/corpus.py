"""Real text with a held-out split: a directory of text files (`data=files`, `data=stdlib`) or one file
(`data=text`), read as bytes, each split a flat uint8 array that `WindowSampler` draws windows from.

- A directory splits BY DOCUMENT: a file is held out when the hash of its path relative to `data.path`
  falls below `data.holdout`, so the split does not depend on the machine, the listing order or which
  other files exist, and a file never moves between splits when files are added. Each split is its
  documents in the order of their relative paths, each followed by one `SEPARATOR` byte; a window may
  cross from one document into the next of the same split, never into the other split.
- One file splits by position: its last `data.holdout` fraction is the eval split.
"""
from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "eval")
# NUL between documents: it occurs in no text file, so the model learns it as "a new file starts here".
SEPARATOR = 0


@dataclass(frozen=True)
class Split:
    """The bytes of one split, the documents they came from, and what to call them in a message."""

    tokens: np.ndarray  # uint8, flat
    documents: tuple[str, ...]  # relative paths (a directory), or the one file's name
    what: str


def held_out_score(relative: str) -> float:
    """A number in [0, 1) fixed by the relative path alone (sha256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big") / 2.0 ** 64


def list_documents(root: Path, glob: str, exclude: tuple[str, ...] | list[str]) -> list[str]:
    """The relative paths (posix) of the files under `root` that `glob` matches and no `exclude` pattern
    does (fnmatch on the relative path, `*` crossing `/`), sorted."""
    names = sorted(p.relative_to(root).as_posix() for p in root.glob(glob) if p.is_file())
    return [n for n in names if not any(fnmatch.fnmatchcase(n, pattern) for pattern in exclude)]


def split_documents(names: list[str], holdout: float) -> dict[str, list[str]]:
    """Train and eval documents: held out when `held_out_score < holdout`; the lowest score goes to eval
    and the highest to train when a side would otherwise be empty (needs two documents)."""
    scored = sorted(names, key=held_out_score)
    cut = sum(held_out_score(n) < holdout for n in scored)
    cut = min(max(cut, 1), len(scored) - 1)
    return {"eval": sorted(scored[:cut]), "train": sorted(scored[cut:])}


def read_directory_split(root: str | Path, *, glob: str, exclude, holdout: float, split: str) -> Split:
    """Split `split` of the directory `root`, its documents read and joined with `SEPARATOR`. Raises
    ValueError naming the directory and the fix when it holds fewer than two matching documents."""
    root = Path(root).expanduser()
    where = f"data.path={str(root)!r}"
    if not root.is_dir():
        raise FileNotFoundError(f"{where} is not a directory: data=files reads a directory of text files")
    names = list_documents(root, glob, exclude)
    if not names:
        anything = next((p for p in root.rglob("*") if p.is_file()), None)
        why = "is empty" if anything is None else f"has no file matching data.glob={glob!r}" + (
            f" outside data.exclude={list(exclude)}" if exclude else "")
        raise ValueError(f"{where} {why}: point data.path at a directory of text files or change data.glob")
    if len(names) < 2:
        raise ValueError(f"{where} has one file matching data.glob={glob!r} ({names[0]}); a held-out split by "
                         f"document needs two or more: add files or use data=text data.path={root / names[0]}")
    documents = split_documents(names, holdout)[split]
    parts = []
    for name in documents:
        parts += [(root / name).read_bytes(), bytes([SEPARATOR])]
    tokens = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return Split(tokens, tuple(documents), f"the {split} split of {where} ({len(documents)} of {len(names)} "
                                           f"files matching data.glob={glob!r})")


def text_split(tokens: np.ndarray, *, path: str, holdout: float, split: str) -> Split:
    """Split `split` of one file's bytes: the eval split is the last `holdout` fraction."""
    cut = len(tokens) - int(round(holdout * len(tokens)))
    part = tokens[:cut] if split == "train" else tokens[cut:]
    share = f"first {1 - holdout:.0%}" if split == "train" else f"last {holdout:.0%}"
    return Split(part, (Path(path).name,), f"the {split} split of data.path={path!r} (its {share})")
