"""The loss, one contract for the trainer and for users' own loops, and the trainer's per-token metrics.

`causal_lm_loss(logits, labels, sp)` is the mean cross-entropy over every labelled token of the replica
(all ranks of the sp group together). Its value is that mean, the same on every rank. Its gradient is
scaled so that the gradients *averaged* over all ranks (what DDP, FSDP, DeepSpeed and nsa_dist's engines
do, over dp x sp) are the one-process gradients of that mean: each rank's share of the sum, times the sp
degree. This is the only place the sp scaling is written; the trainer's `token_metrics` calls it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nsa_dist.data.batch import Batch
from nsa_dist.data.sharding import IGNORE_INDEX
from nsa_dist.parallel import SequenceParallel
from nsa_dist.parallel.collectives import collective_device


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, sp: SequenceParallel | None = None, *,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over every labelled token of the replica, from this rank's `logits [B, T, V]`
    and shifted `labels [B, T]` (nsa_dist.shard_batch); tokens labelled `ignore_index` do not count.

    With `sp`, the loss sum and the count of labelled tokens are all-reduced over the sp group (one small
    all-reduce). Backpropagate it as it is under any engine that averages gradients over the ranks (module
    docstring); a loop that instead sums them over the sp group divides by `sp.size`.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up: both are "
                         "this rank's shard, labels shifted (nsa_dist.shard_batch)")
    local = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                            reduction="sum")
    count = (labels != ignore_index).sum()
    if sp is None:
        return local / count.clamp_min(1)
    totals = torch.stack([local.detach().double(), count.double()]).to(collective_device(sp.group))
    dist.all_reduce(totals, group=sp.group)
    total_loss, total_count = totals.to(local.device).unbind()
    share = local * sp.size  # averaged over the sp ranks, the shares sum to the replica's loss sum
    # value: the replica's sum; gradient: this rank's share
    return (share + (total_loss.to(local.dtype) - share.detach())) / total_count.clamp_min(1).to(local.dtype)


def token_metrics(logits: torch.Tensor, batch: Batch, sp: SequenceParallel | None = None, *,
                  loss_on: str = "all") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to backpropagate (`causal_lm_loss`), and the replica's metrics: mean cross-entropy over all
    its targets, plus loss and accuracy on the answer tokens when there are some.

    `loss_on="answers"` (`data.loss_on`) backpropagates the mean over the answer targets only: a retrieval
    task's few answers would drown in a loss over every token. The metrics are the same either way. With
    `sp`, `batch` holds this rank's shard of the replica's sequences; the metrics are summed over the sp
    group (one small all-reduce).
    """
    mask = batch.answer_mask
    if loss_on == "answers":
        if mask is None:
            raise ValueError("data.loss_on=answers needs a task with answers (data=needle, mqar or passkey); "
                             "use data.loss_on=all for text and token data")
        loss = causal_lm_loss(logits, batch.targets.masked_fill(~mask, IGNORE_INDEX), sp)
    else:
        loss = causal_lm_loss(logits, batch.targets, sp)
    with torch.no_grad():
        per_token = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
        per_token = per_token.view_as(batch.targets).double()  # (B, T_local)
        sums = [per_token.sum().reshape(1)]
        if mask is not None:
            correct = (logits.argmax(-1) == batch.targets) & mask  # (B, T_local)
            sums += [(per_token * mask).sum().reshape(1), correct.sum(-1).double(), mask.sum(-1).double()]
        sums = torch.cat(sums)  # (1 [+ 1 + B + B],)
        if sp is not None:
            dist.all_reduce(sums, group=sp.group)
    tokens = batch.targets.numel() * (1 if sp is None else sp.size)
    metrics = {"loss": (sums[0] / tokens).float()}
    if mask is not None:
        rows = batch.targets.shape[0]
        correct_rows, mask_rows = sums[2:2 + rows], sums[2 + rows:]
        metrics["answer_loss"] = (sums[1] / mask_rows.sum()).float()
        metrics["answer_accuracy"] = (correct_rows.sum() / mask_rows.sum()).float()
        # Named for no task: passkey, needle and MQAR rows alike are right only when every answer token is.
        metrics["answer_exact"] = (correct_rows == mask_rows).float().mean()
    return loss, metrics
