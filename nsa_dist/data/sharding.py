"""A causal LM's batch when its sequence is sharded: `shard_batch` (its loss: nsa_dist.training.loss.causal_lm_loss).

Labels are shifted on the full sequence, before sharding: the last token of a rank's chunk predicts
the first token of the next chunk, which another rank holds. After the shift each token's label
sits at the token itself, so the shards of inputs and labels line up and the loss needs no
communication beyond one count.

What runs under sequence parallelism (`sp` set):
- rows of one sequence each, any batch size;
- packed documents in a batch of one, as the global `cu_seqlens` or as Hugging Face `position_ids`
  that restart at 0 (`shard_batch` turns those into `cu_seqlens`: a shard cannot see its documents
  whole); the last token of each document predicts nothing (label -100);
- not padding: NSA reads no attention mask, so a converted model refuses one with zeros. Pack instead.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from nsa_dist.data.batch import Batch
from nsa_dist.parallel import SequenceParallel, check_length, packed_cu_seqlens, shard

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`labels [B, T]` moved left by one, so position t holds what token t predicts; the last position
    of the row (and of each packed document) gets `ignore_index`."""
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], 1)  # (B, T)
    if cu_seqlens is not None:
        shifted[:, cu_seqlens[1:].to(device=labels.device, dtype=torch.int64) - 1] = ignore_index
    return shifted


def shard_batch(batch, sp: SequenceParallel | None, *, ignore_index: int = IGNORE_INDEX,
                select_size: int | None = None):
    """This rank's shard of a replica's batch, labels shifted first.

    - `nsa_dist.data.Batch` (the trainer's; its targets are shifted already): a Batch of shards.
    - `(input_ids, labels)` as Hugging Face users hold them, labels unshifted and as long as the inputs
      (`labels=None`: the inputs): `(input_ids shard, shifted labels shard)`.
    - a dict with `input_ids` (and optional `labels`, `position_ids`, `cu_seqlens`, and any other
      `[B, T]` tensors such as `attention_mask`): a dict of shards with shifted `labels`. Packed
      documents (`cu_seqlens`, or `position_ids` that restart at 0) end each document's labels with
      `ignore_index`; under `sp` restarting position_ids become the global `cu_seqlens`, and plain
      ones their shard (the global positions a converted model expects).

    Call the model on the inputs (`model(**batch)` for a dict without `labels`, or
    `model(input_ids=..., cu_seqlens=...)`) and `causal_lm_loss(logits, labels, sp)`. Without `sp`
    nothing is sharded, only shifted.

    Under `sp` the sequence must split into 2P zigzag chunks of whole selection blocks: a multiple of
    2P x the model's `select_size`. Pass `select_size` (the NSAConfig's) to have that checked here, so that
    the error names the length to pad to, not only the 2P chunks.
    """
    if sp is not None:
        _check_shardable(batch, sp, select_size)
    if isinstance(batch, Batch):
        if sp is None:
            return batch
        mask = None if batch.answer_mask is None else shard(batch.answer_mask, sp)
        return Batch(shard(batch.inputs, sp), shard(batch.targets, sp), mask)
    if isinstance(batch, Mapping):
        return _shard_dict(dict(batch), sp, ignore_index)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        input_ids, labels = batch
        labels = shift_labels(input_ids if labels is None else labels, ignore_index=ignore_index)
        return (input_ids, labels) if sp is None else (shard(input_ids, sp), shard(labels, sp))
    raise TypeError(f"shard_batch takes an nsa_dist.data.Batch, an (input_ids, labels) pair or a dict with "
                    f"input_ids, got {type(batch).__name__}")


def _shard_dict(batch: dict, sp: SequenceParallel | None, ignore_index: int) -> dict:
    if "input_ids" not in batch:
        raise ValueError(f"shard_batch needs input_ids in the batch, got {', '.join(batch) or 'nothing'}")
    input_ids = batch["input_ids"]
    rows = tuple(input_ids.shape[:2])
    cu = batch.get("cu_seqlens")
    position_ids = batch.get("position_ids")
    if cu is None and position_ids is not None:
        cu = packed_cu_seqlens(position_ids)
    labels = batch.get("labels")
    batch["labels"] = shift_labels(input_ids if labels is None else labels, cu, ignore_index)
    if sp is None:
        return batch
    if cu is not None:
        batch.pop("position_ids", None)  # restarting positions; the layers derive them from cu_seqlens
        batch["cu_seqlens"] = cu
    return {k: shard(v, sp) if isinstance(v, torch.Tensor) and k != "cu_seqlens" and tuple(v.shape[:2]) == rows
            else v for k, v in batch.items()}


def _check_shardable(batch, sp: SequenceParallel, select_size: int | None) -> None:
    inputs = batch.inputs if isinstance(batch, Batch) else batch.get("input_ids") if isinstance(batch, Mapping) \
        else batch[0] if isinstance(batch, (tuple, list)) and batch else None
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return  # the type errors below name what was passed
    try:
        check_length(inputs.shape[1], sp.size, multiple=select_size or 1, what="the batch's sequence")
    except ValueError as e:
        if select_size:
            raise
        raise ValueError(f"{e} x the model's nsa select_size (each zigzag chunk must be whole selection blocks: "
                         f"{2 * sp.size} x 64 = {2 * sp.size * 64} tokens for select_size=64); pass "
                         "shard_batch(..., select_size=nsa_config.select_size) to be told the exact length") from e
