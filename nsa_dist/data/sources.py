"""Byte-level training data: random windows of a file or of a directory of files, or a synthetic passkey task.

Every source yields `Batch(inputs, targets, answer_mask)` with `inputs`/`targets` `[B, T]` int64
(targets are inputs shifted by one) and draws all randomness from one explicit `torch.Generator`,
so a run is reproducible and `state_dict()` captures where the stream is.

Kinds:
    passkey  filler sentences with "The passkey is NNNNN." hidden at a random depth, ending with the
             question and the passkey again; `answer_mask` marks the target positions of the answer.
             Made in process, so the default run needs no download.
    text     any file read as raw bytes (vocab 256), memory-mapped; its last `holdout` fraction is the
             eval split.
    files    a directory of text files (`path`, `glob`, `exclude`) read as bytes, split by document
             (nsa_dist.data.corpus); `data=stdlib` is the running Python's standard library.
    tokens   a memory-mapped `.bin` of np.uint8, np.uint16 or np.uint32 token ids (`check_token_file`
             scans it once before training: ids below the vocabulary, the dtype plausible).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nsa_dist.data.batch import Batch, SeededStream, windows_to_batch
from nsa_dist.data.corpus import SPLITS, read_directory_split, text_split
from nsa_dist.data.tasks import build_task, check_task_config

DATA_KINDS = ("passkey", "text", "files", "tokens", "mqar", "needle")
BYTE_KINDS = ("passkey", "text", "files")
TOKEN_DTYPES = ("uint8", "uint16", "uint32")
# Eval batches come from their own stream (seed + this offset), so they never repeat a training batch.
EVAL_SEED_OFFSET = 1_000_003
# Token files are scanned this many ids at a time, so the check holds any file in bounded memory.
SCAN_CHUNK = 1 << 24


@dataclass(frozen=True)
class DataConfig:
    kind: str = "passkey"
    seq_len: int = 512
    path: str | None = None
    token_dtype: str = "uint16"
    # text and files: the held-out share (of the file's tail, or of the documents); files: which files
    glob: str = "**/*"
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns on the path relative to data.path
    holdout: float = 0.05
    passkey_digits: int = 5
    # mqar and needle (nsa_dist.data.tasks): noise, key and value ids in model.vocab_size, then each task's shape
    filler_vocab: int = 64
    key_vocab: int = 96
    value_vocab: int = 96
    num_pairs: int = 16  # mqar: key-value pairs per window
    num_queries: int = 16  # mqar: keys asked for at the end
    min_distance: int = 64  # mqar: fewest tokens from a pair to its query
    pair_start: int = 64  # mqar: no pair in the first tokens (NSA always attends to its initial block)
    key_len: int = 1  # needle
    value_len: int = 2  # needle: the answers
    num_distractors: int = 0  # needle: needles with other keys
    depth_min: float = 0.0  # needle: where it sits, drawn uniformly per window (0: first, 1: last)
    depth_max: float = 1.0
    loss_on: str = "all"  # all | answers: which targets the training loss averages over

    def __post_init__(self):
        self.validate()  # built means valid: no later reader validates again

    def validate(self) -> "DataConfig":
        if self.kind not in DATA_KINDS:
            raise ValueError(f"unknown data.kind={self.kind!r}: choose one of {DATA_KINDS} "
                             f"(data=passkey, data=text, data=files, data=stdlib or data=tokens)")
        if self.seq_len <= 0:
            raise ValueError(f"data.seq_len must be positive, got {self.seq_len}")
        if self.kind in ("text", "tokens"):
            if not self.path:
                raise ValueError(f"data={self.kind} reads a file: pass data.path=/path/to/file")
            if not Path(self.path).expanduser().is_file():
                raise FileNotFoundError(f"data.path={self.path!r} does not exist or is not a file")
        if self.kind == "files":
            if not self.path or not Path(self.path).expanduser().is_dir():
                raise FileNotFoundError(f"data=files reads a directory: data.path={self.path!r} is not one; pass "
                                        f"data.path=/path/to/dir (and data.glob='**/*.py'), or use data=stdlib")
        if self.kind in ("text", "files") and not 0 < self.holdout < 1:
            raise ValueError(f"data.holdout is the held-out share of the data, in (0, 1): got {self.holdout}")
        if self.kind == "tokens" and self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"unknown data.token_dtype={self.token_dtype!r}: choose one of {TOKEN_DTYPES}")
        if self.kind == "passkey":
            if not 1 <= self.passkey_digits <= 18:
                raise ValueError(f"data.passkey_digits must be in 1..18, got {self.passkey_digits}")
            shortest = len(PasskeyTask.frame(self.passkey_digits))
            if self.seq_len + 1 < shortest:
                raise ValueError(f"data.seq_len={self.seq_len} cannot hold the passkey needle and question "
                                 f"({shortest} bytes with {self.passkey_digits} digits): raise data.seq_len")
        check_task_config(self)
        return self


class WindowSampler(SeededStream):
    """Uniformly random windows of `seq_len + 1` tokens from a memory-mapped token array."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, vocab_size: int, generator: torch.Generator,
                 source: str, documents: tuple[str, ...] = ()):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{source} holds {len(tokens)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}: "
                             f"use a longer file or a smaller data.seq_len")
        self.tokens = tokens
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.generator = generator
        self.source = source
        self.documents = documents  # the files the tokens came from (data=text|files), for a study's record

    def sample(self, batch_size: int) -> Batch:
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (batch_size,), generator=self.generator)
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
        windows = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
        top = int(windows.max())
        if top >= self.vocab_size:
            raise ValueError(f"{self.source} holds token id {top}, outside model.vocab_size={self.vocab_size}: "
                             f"raise model.vocab_size or check data.token_dtype")
        return windows_to_batch(windows)


FILLER_SENTENCES = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
    "The river runs to the sea. ",
    "A cat sleeps on the warm stone. ",
    "Rain falls on the quiet town. ",
)


class PasskeyTask(SeededStream):
    """Needle-in-a-haystack retrieval, generated in process.

    A window reads `<filler> The passkey is 48213. <filler> What is the passkey? The passkey is 48213`:
    the filler is easy to learn (a few fixed sentences in random order), the digits of the needle are
    random, and the closing digits can only be predicted by finding the needle. The window ends on the
    answer, so `answer_mask` marks its last `digits` targets.
    """

    question = "What is the passkey? The passkey is "

    def __init__(self, *, seq_len: int, digits: int, generator: torch.Generator):
        self.seq_len = seq_len
        self.digits = digits
        self.generator = generator
        self._sentences = [s.encode() for s in FILLER_SENTENCES]

    @classmethod
    def frame(cls, digits: int) -> str:
        """The fixed text around the passkey, with zeros for its digits (its length is the minimum)."""
        key = "0" * digits
        return f"The passkey is {key}. " + cls.question + key

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.generator))

    def _filler(self, length: int) -> tuple[bytearray, list[int]]:
        """`length` bytes of random filler sentences and the offsets where sentences start."""
        text, starts = bytearray(), []
        while len(text) < length:
            starts.append(len(text))
            text += self._sentences[self._randint(len(self._sentences))]
        return text[:length], [s for s in starts if s <= length] or [0]

    def _window(self) -> bytes:
        key = "".join(str(self._randint(10)) for _ in range(self.digits))
        needle = f"The passkey is {key}. ".encode()
        tail = (self.question + key).encode()
        filler, starts = self._filler(self.seq_len + 1 - len(needle) - len(tail))
        at = starts[self._randint(len(starts))]
        return bytes(filler[:at] + needle + filler[at:] + tail)

    def sample(self, batch_size: int) -> Batch:
        windows = torch.tensor([list(self._window()) for _ in range(batch_size)], dtype=torch.int64)  # (B, T + 1)
        answer_mask = torch.zeros(batch_size, self.seq_len, dtype=torch.bool)
        answer_mask[:, -self.digits:] = True
        return windows_to_batch(windows, answer_mask)


def load_token_file(path: str | Path, dtype: str) -> np.ndarray:
    """Memory-map `path` as a flat array of `dtype` tokens."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist or is not a file")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"data.path={str(path)!r} has {size} bytes, not a whole number of {dtype} tokens: "
                         f"check data.token_dtype")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def check_token_file(path: str | Path, dtype: str, *, vocab_size: int) -> str:
    """Scan the whole token file, chunk by chunk over the memory map, before any rank trains on it.

    Raises ValueError naming the file and the fix for an id outside the vocabulary, or for every
    odd-position id being 0 (what a file of wider little-endian ids read as `dtype` looks like).
    Returns what was checked, for the log.
    """
    tokens = load_token_file(path, dtype)
    where = f"data.path={str(path)!r}"
    top, top_at, odd_nonzero, even_nonzero = -1, 0, False, False
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.asarray(tokens[start:start + SCAN_CHUNK])
        if chunk.size and int(chunk.max()) > top:
            top, top_at = int(chunk.max()), start + int(chunk.argmax())
        first_odd = (start + 1) % 2  # chunk starts are even, but keep it exact
        odd_nonzero = odd_nonzero or bool(chunk[first_odd::2].any())
        even_nonzero = even_nonzero or bool(chunk[1 - first_odd::2].any())
    if top >= vocab_size:
        raise ValueError(f"{where} holds token id {top} (token {top_at} of {len(tokens)}, read as {dtype}), outside "
                         f"model.vocab_size={vocab_size}: raise model.vocab_size or check data.token_dtype")
    wider = {"uint8": "uint16", "uint16": "uint32"}.get(dtype)
    if wider and len(tokens) >= 64 and even_nonzero and not odd_nonzero:
        raise ValueError(f"{where} read as {dtype} has every odd-position id 0 ({len(tokens)} tokens), as when "
                         f"{wider} ids are read as {dtype}: set data.token_dtype={wider}")
    return f"{where}: {len(tokens)} {dtype} tokens, ids 0..{top} < model.vocab_size={vocab_size}"


def check_vocab_size(kind: str, vocab_size: int) -> None:
    """The byte-level kinds (passkey, text) need every byte value as a token id."""
    if kind in BYTE_KINDS and vocab_size < 256:
        raise ValueError(f"data={kind} is byte-level: model.vocab_size must be at least 256, got {vocab_size}")


def build_source(cfg: DataConfig, *, vocab_size: int, generator: torch.Generator,
                 split: str = "train") -> WindowSampler | PasskeyTask:
    """The batch source `cfg` describes, drawing its randomness from `generator`.

    `split="eval"` is the held-out split of `data=text|files` (the trainer's eval batch, loss by position);
    the synthetic tasks and token files have one stream, made different by the generator's seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
    check_vocab_size(cfg.kind, vocab_size)
    if cfg.kind == "passkey":
        return PasskeyTask(seq_len=cfg.seq_len, digits=cfg.passkey_digits, generator=generator)
    if cfg.kind in ("mqar", "needle"):
        return build_task(cfg, vocab_size=vocab_size, generator=generator)
    if cfg.kind == "tokens":
        return WindowSampler(load_token_file(cfg.path, cfg.token_dtype), seq_len=cfg.seq_len, vocab_size=vocab_size,
                             generator=generator, source=f"data.path={cfg.path!r}")
    if cfg.kind == "files":
        part = read_directory_split(cfg.path, glob=cfg.glob, exclude=cfg.exclude, holdout=cfg.holdout, split=split)
    else:
        part = text_split(load_token_file(cfg.path, "uint8"), path=cfg.path, holdout=cfg.holdout, split=split)
    if len(part.tokens) < cfg.seq_len + 1:
        raise ValueError(f"{part.what} holds {len(part.tokens)} bytes, fewer than data.seq_len + 1 = "
                         f"{cfg.seq_len + 1}: use more data, a smaller data.seq_len or another data.holdout")
    return WindowSampler(part.tokens, seq_len=cfg.seq_len, vocab_size=vocab_size, generator=generator,
                         source=part.what, documents=part.documents)


def split_sizes(cfg: DataConfig, *, vocab_size: int) -> dict[str, int]:
    """Files and bytes of the train and eval splits of `data=text|files`, each split read once: the refusals
    (an empty directory, a glob that matches nothing, a split shorter than a window) come from here before
    any rank starts."""
    sizes = {}
    for split in SPLITS:
        source = build_source(cfg, vocab_size=vocab_size, generator=torch.Generator(), split=split)
        sizes.update({f"{split}_documents": len(source.documents), f"{split}_bytes": len(source.tokens)})
    return sizes
