"""The trainer's loss on a shard: over every target, or over the answer targets only (`data.loss_on`)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from multirank import run_ranks
from nsa_dist.data import Batch
from nsa_dist.loss import shard_batch, token_metrics
from nsa_dist.parallel import SequenceParallel, shard

VOCAB, T = 11, 32


def _batch(seed: int = 0) -> tuple[torch.Tensor, Batch]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, T, VOCAB, generator=g)
    targets = torch.randint(0, VOCAB, (2, T), generator=g)
    mask = torch.zeros(2, T, dtype=torch.bool)
    # With P = 2 (chunks of 8), rank 0 holds positions 0-7 and 24-31: three answers there, one on rank 1.
    mask[0, 3] = mask[0, 4] = mask[1, 30] = mask[1, 10] = True
    return logits, Batch(targets.clone(), targets, mask)


def test_answer_loss_is_the_mean_over_the_answer_targets_alone():
    logits, batch = _batch()
    loss, metrics = token_metrics(logits, batch, loss_on="answers")
    expected = F.cross_entropy(logits[batch.answer_mask], batch.targets[batch.answer_mask])
    assert torch.allclose(loss, expected)
    everything, _ = token_metrics(logits, batch)
    assert torch.allclose(everything, F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()))
    assert torch.allclose(metrics["answer_loss"], expected)


def _sharded_losses(rank: int, world: int) -> list[float]:
    sp = SequenceParallel()
    logits, batch = _batch()
    local = shard_batch(batch, sp)
    out = []
    for loss_on in ("all", "answers"):
        loss, _ = token_metrics(shard(logits, sp), local, sp, loss_on=loss_on)
        total = loss.detach().clone()
        dist.all_reduce(total)  # what the gradient average over ranks sees, times the world size
        out.append(float(total) / world)
    return out


def test_sharded_loss_averaged_over_ranks_is_the_whole_replicas_loss():
    logits, batch = _batch()
    expected = [float(token_metrics(logits, batch, loss_on=loss_on)[0]) for loss_on in ("all", "answers")]
    for got in run_ranks(_sharded_losses, 2):
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), rtol=1e-5), (got, expected)
