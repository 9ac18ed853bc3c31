"""Synthetic retrieval tasks whose answers only long-range attention can find, with the loss on the answers.

Both tasks share one token layout over `vocab_size` ids, in three disjoint ranges:
`[0, filler_vocab)` noise, then `key_vocab` key ids, then `value_vocab` value ids. Noise never looks
like a key, so the only way to predict an answer is to find where its key appeared earlier and copy
the token that followed it.

    MQARTask    multi-query associative recall: `num_pairs` key-value pairs scattered at random
                positions in noise, then `num_queries` of those keys, each followed by its value.
                Every pair ends at least `min_distance` tokens before the first query.
    NeedleTask  one key-value needle at a chosen depth in noise (optionally among distractor
                needles with other keys), then its key as the question and its value as the answer.

Each yields `nsa_dist.data.Batch` like `PasskeyTask` (targets are inputs shifted by one, and
`answer_mask` marks the targets that are answers), draws all randomness from one explicit
`torch.Generator`, and checkpoints its stream with `state_dict()`. `sample_with_sources` also returns,
for every answer, the input position of the token it copies (`targets == inputs[sources]` there,
-1 elsewhere), so an evaluation can ask whether the block holding it was selected.

`build_task` makes either from a `DataConfig` (`data=mqar`, `data=needle`; nsa_dist.data.sources.build_source
calls it), and `check_task_config` refuses settings it cannot make, naming the data.* key.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nsa_dist.data.batch import Batch, SeededStream, windows_to_batch


@dataclass(frozen=True)
class TokenLayout:
    """Where noise, keys and values live in the vocabulary."""

    vocab_size: int = 256
    filler_vocab: int = 64
    key_vocab: int = 96
    value_vocab: int = 96

    def __post_init__(self):
        for name in ("filler_vocab", "key_vocab", "value_vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        used = self.filler_vocab + self.key_vocab + self.value_vocab
        if used > self.vocab_size:
            raise ValueError(f"filler_vocab + key_vocab + value_vocab = {used} exceeds vocab_size={self.vocab_size}: "
                             f"shrink a range or raise vocab_size")

    @property
    def first_key(self) -> int:
        return self.filler_vocab

    @property
    def first_value(self) -> int:
        return self.filler_vocab + self.key_vocab

    def is_key(self, token: int) -> bool:
        return self.first_key <= token < self.first_value


def _distinct(generator: torch.Generator, rows: int, population: int, count: int) -> torch.Tensor:
    """`count` distinct ids from `range(population)` per row, in random order, `[rows, count]`."""
    return torch.rand(rows, population, generator=generator).argsort(dim=1)[:, :count]


def _spaced_starts(generator: torch.Generator, rows: int, region: int, count: int, length: int) -> torch.Tensor:
    """Sorted starts of `count` non-overlapping spans of `length` tokens in `[0, region)`, uniform per row.

    Choosing `count` distinct slots among `region - count * (length - 1)` and shifting the i-th by
    `i * (length - 1)` maps each arrangement of spans to exactly one slot set, so all are equally likely.
    """
    slots = region - count * (length - 1)
    chosen = _distinct(generator, rows, slots, count).sort(dim=1).values
    return chosen + torch.arange(count) * (length - 1)


def _task_batch(windows: torch.Tensor, answer_targets: torch.Tensor, sources: torch.Tensor) -> tuple[Batch, torch.Tensor]:
    """Cut `[B, T + 1]` windows into a Batch; `answer_targets`/`sources` index window positions of answers."""
    B, T = windows.shape[0], windows.shape[1] - 1
    rows = torch.arange(B)[:, None]
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[rows, answer_targets - 1] = True  # the target at index t is window token t + 1
    source_map = torch.full((B, T), -1, dtype=torch.int64)
    source_map[rows, answer_targets - 1] = sources
    return windows_to_batch(windows, mask), source_map


class _GeneratedTask(SeededStream):
    """A retrieval task: a batch, and where each answer's source token sits."""

    def sample(self, batch_size: int) -> Batch:
        return self.sample_with_sources(batch_size)[0]

    def sample_with_sources(self, batch_size: int) -> tuple[Batch, torch.Tensor]:
        raise NotImplementedError


class MQARTask(_GeneratedTask):
    """Multi-query associative recall in noise.

    Window (`seq_len + 1` tokens): a context of noise holding `num_pairs` adjacent `key value` pairs
    at uniformly random, non-overlapping positions, then `num_queries` distinct keys of those pairs,
    each followed by its value. Keys within a window are distinct; values may repeat. Each query is at
    least `min_distance` tokens after the value it must copy, and the distance ranges up to the whole
    context, so a model whose attention reaches less than `min_distance` back sits at chance
    (1 / value_vocab). Answers are the `num_queries` values of the query section. `pair_start` keeps
    pairs out of the first tokens: NSA always attends to its initial block, which would hold free answers.
    """

    def __init__(self, *, seq_len: int, num_pairs: int, num_queries: int, min_distance: int = 0,
                 pair_start: int = 0, layout: TokenLayout = TokenLayout(), generator: torch.Generator):
        if not 1 <= num_queries <= num_pairs:
            raise ValueError(f"need 1 <= num_queries <= num_pairs, got num_queries={num_queries}, num_pairs={num_pairs}")
        if num_pairs > layout.key_vocab:
            raise ValueError(f"num_pairs={num_pairs} distinct keys need key_vocab >= {num_pairs}, got {layout.key_vocab}")
        context = seq_len + 1 - 2 * num_queries
        region = context - max(min_distance, 1) + 1 - pair_start
        if min_distance < 0 or pair_start < 0 or region < 2 * num_pairs:
            raise ValueError(f"seq_len={seq_len} cannot hold {num_pairs} pairs at least min_distance={min_distance} "
                             f"before {num_queries} queries: raise seq_len or lower the others")
        self.seq_len, self.num_pairs, self.num_queries = seq_len, num_pairs, num_queries
        self.min_distance, self.pair_start, self.layout, self.generator = min_distance, pair_start, layout, generator
        self.context = context
        self.pair_region = region  # a pair's value lands at most at context - min_distance

    def sample_with_sources(self, batch_size: int) -> tuple[Batch, torch.Tensor]:
        g, lay, B = self.generator, self.layout, batch_size
        P, Q = self.num_pairs, self.num_queries
        windows = torch.randint(0, lay.filler_vocab, (B, self.seq_len + 1), generator=g)
        keys = lay.first_key + _distinct(g, B, lay.key_vocab, P)  # (B, P)
        values = lay.first_value + torch.randint(0, lay.value_vocab, (B, P), generator=g)
        starts = self.pair_start + _spaced_starts(g, B, self.pair_region, P, 2)  # (B, P)
        rows = torch.arange(B)[:, None]
        windows[rows, starts] = keys
        windows[rows, starts + 1] = values
        asked = _distinct(g, B, P, Q)  # (B, Q): which pairs the queries ask for, in query order
        query_at = self.context + 2 * torch.arange(Q)
        windows[:, query_at] = keys.gather(1, asked)
        windows[:, query_at + 1] = values.gather(1, asked)
        return _task_batch(windows, (query_at + 1).expand(B, Q), starts.gather(1, asked) + 1)


class NeedleTask(_GeneratedTask):
    """A needle `key... value...` at a chosen depth in noise, asked for at the end of the window.

    Window (`seq_len + 1` tokens): noise holding the needle (`key_len` key tokens then `value_len`
    value tokens) and `num_distractors` more needles with other first keys, then the needle's key
    again and its value; the `value_len` answers are the closing value tokens.

    `depth` places the needle's first token: 0.0 at the start of the context, 1.0 as late as it fits
    (right before the question); a float fixes it, a `(low, high)` pair draws it uniformly per window.
    Distractors go at random positions that do not overlap the needle or each other.
    """

    def __init__(self, *, seq_len: int, key_len: int = 1, value_len: int = 4, num_distractors: int = 0,
                 depth: float | tuple[float, float] = (0.0, 1.0), layout: TokenLayout = TokenLayout(),
                 generator: torch.Generator):
        if key_len < 1 or value_len < 1:
            raise ValueError(f"key_len and value_len must be >= 1, got {key_len}, {value_len}")
        if num_distractors + 1 > layout.key_vocab:
            raise ValueError(f"{num_distractors + 1} needles need key_vocab >= {num_distractors + 1}, "
                             f"got {layout.key_vocab}")
        self.needle_len = key_len + value_len
        self.context = seq_len + 1 - self.needle_len
        if self.context < (num_distractors + 1) * self.needle_len:
            raise ValueError(f"seq_len={seq_len} cannot hold {num_distractors + 1} needles of {self.needle_len} "
                             f"tokens and the question: raise seq_len or lower num_distractors")
        self.seq_len, self.key_len, self.value_len = seq_len, key_len, value_len
        self.num_distractors, self.layout, self.generator = num_distractors, layout, generator
        self.depth = depth

    def needle_start(self, depth: float) -> int:
        """Window position of the needle's first token at `depth` in [0, 1]."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        return round(depth * (self.context - self.needle_len))

    def _depths(self, batch_size: int) -> torch.Tensor:
        if isinstance(self.depth, (int, float)):
            return torch.full((batch_size,), float(self.depth))
        low, high = self.depth
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"depth range must satisfy 0 <= low <= high <= 1, got {self.depth}")
        return low + (high - low) * torch.rand(batch_size, generator=self.generator)

    def _distractor_starts(self, needle_at: int) -> list[int]:
        """Starts of the distractors: random candidates in turn, kept when they overlap nothing placed."""
        L = self.needle_len
        taken = [(needle_at, needle_at + L)]
        for s in torch.randperm(self.context - L + 1, generator=self.generator).tolist():
            if len(taken) > self.num_distractors:
                break
            if all(s + L <= lo or s >= hi for lo, hi in taken):
                taken.append((s, s + L))
        if len(taken) <= self.num_distractors:
            raise ValueError(f"no room for {self.num_distractors} distractors of {L} tokens beside the needle at "
                             f"{needle_at}: raise seq_len or lower num_distractors")
        return [lo for lo, _ in taken[1:]]

    def sample_with_sources(self, batch_size: int) -> tuple[Batch, torch.Tensor]:
        g, lay, B = self.generator, self.layout, batch_size
        K, V, L = self.key_len, self.value_len, self.needle_len
        windows = torch.randint(0, lay.filler_vocab, (B, self.seq_len + 1), generator=g)
        first_keys = lay.first_key + _distinct(g, B, lay.key_vocab, self.num_distractors + 1)
        rest_keys = lay.first_key + torch.randint(0, lay.key_vocab, (B, self.num_distractors + 1, K - 1), generator=g)
        needles = torch.cat([first_keys[..., None], rest_keys,
                             lay.first_value + torch.randint(0, lay.value_vocab, (B, self.num_distractors + 1, V),
                                                             generator=g)], dim=2)  # (B, needles, L)
        needle_at = torch.tensor([self.needle_start(float(d)) for d in self._depths(B)])
        for b in range(B):
            at = int(needle_at[b])
            for i, s in enumerate([at] + self._distractor_starts(at)):
                windows[b, s:s + L] = needles[b, i]
        windows[:, self.context:] = needles[:, 0]
        answers = self.context + K + torch.arange(V)
        return _task_batch(windows, answers.expand(B, V), needle_at[:, None] + K + torch.arange(V))


def recall_answers(inputs: torch.Tensor, answer_mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Each answer recomputed from the inputs alone, by the rule both tasks follow, `-1` off the mask.

    The answer at target `t` copies the token after the earliest earlier occurrence of the key run
    that ends the inputs up to `t` (the key tokens, and any value tokens already given after them).
    """
    out = torch.full_like(inputs, -1)
    for b, t in answer_mask.nonzero().tolist():
        row = inputs[b, :t + 1].tolist()
        start = t
        while start > 0 and not layout.is_key(row[start]):
            start -= 1
        while start > 0 and layout.is_key(row[start - 1]):
            start -= 1
        probe = row[start:t + 1]
        for p in range(start - len(probe) + 1):
            if row[p:p + len(probe)] == probe:
                out[b, t] = row[p + len(probe)]
                break
    return out


def answer_accuracy(logits: torch.Tensor, batch: Batch) -> dict[str, float]:
    """Fraction of answer tokens predicted right (argmax), and of windows with every answer right."""
    mask = batch.answer_mask
    correct = (logits.argmax(-1) == batch.targets) & mask
    per_row = correct.sum(1) == mask.sum(1)
    return {"token": float(correct.sum() / mask.sum()), "exact": float(per_row.float().mean())}


def answer_loss(logits: torch.Tensor, batch: Batch, all_tokens_weight: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the answers, plus `all_tokens_weight` times the mean over every target."""
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(),
                                                  reduction="none").view_as(batch.targets)
    loss = per_token[batch.answer_mask].mean()
    if all_tokens_weight:
        loss = loss + all_tokens_weight * per_token.mean()
    return loss


RETRIEVAL_KINDS = ("mqar", "needle")
LOSS_ON = ("all", "answers")
ANSWERED_KINDS = ("passkey",) + RETRIEVAL_KINDS  # the data kinds whose batches carry an answer mask


def build_task(cfg, *, vocab_size: int, generator: torch.Generator) -> MQARTask | NeedleTask:
    """The task `data=mqar|needle` describes (`cfg` a `nsa_dist.data.sources.DataConfig`), over `vocab_size` ids."""
    try:
        layout = TokenLayout(vocab_size=vocab_size, filler_vocab=cfg.filler_vocab, key_vocab=cfg.key_vocab,
                             value_vocab=cfg.value_vocab)
        if cfg.kind == "mqar":
            return MQARTask(seq_len=cfg.seq_len, num_pairs=cfg.num_pairs, num_queries=cfg.num_queries,
                            min_distance=cfg.min_distance, pair_start=cfg.pair_start, layout=layout,
                            generator=generator)
        if cfg.kind == "needle":
            depth = (cfg.depth_min, cfg.depth_max)
            if not 0.0 <= cfg.depth_min <= cfg.depth_max <= 1.0:
                raise ValueError(f"need 0 <= depth_min <= depth_max <= 1, got {depth}")
            return NeedleTask(seq_len=cfg.seq_len, key_len=cfg.key_len, value_len=cfg.value_len,
                              num_distractors=cfg.num_distractors, depth=depth, layout=layout, generator=generator)
    except ValueError as e:
        raise ValueError(f"data={cfg.kind}: {e} (the data.* keys of the same names; vocab_size is "
                         f"model.vocab_size)") from e
    raise ValueError(f"data.kind={cfg.kind!r} is not a retrieval task: choose one of {RETRIEVAL_KINDS}")


def check_task_config(cfg) -> None:
    """Raise ValueError, naming the data.* key, when `cfg` asks for a task or a loss that cannot be made.

    The vocabulary is checked where the model's is known (`build_task`); here the ranges fill it exactly.
    """
    if cfg.loss_on not in LOSS_ON:
        raise ValueError(f"unknown data.loss_on={cfg.loss_on!r}: choose one of {LOSS_ON}")
    if cfg.loss_on == "answers" and cfg.kind not in ANSWERED_KINDS:
        raise ValueError(f"data.loss_on=answers needs answers: data={cfg.kind} has none; use one of {ANSWERED_KINDS}")
    if cfg.kind in RETRIEVAL_KINDS:
        used = max(1, cfg.filler_vocab) + max(1, cfg.key_vocab) + max(1, cfg.value_vocab)
        build_task(cfg, vocab_size=used, generator=torch.Generator())
