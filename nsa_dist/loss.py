"""The training loss and the per-token metrics, on the whole sequence or on this rank's shard of it."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nsa_dist.data import Batch
from nsa_dist.parallel import SequenceParallel
# This rank's zigzag shard of a replica's Batch (its targets were shifted on the full sequence).
from nsa_dist.sp_data import shard_batch  # noqa: F401


def token_metrics(logits: torch.Tensor, batch: Batch, sp: SequenceParallel | None = None, *,
                  loss_on: str = "all") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to backpropagate, and the replica's metrics: mean cross-entropy over all its targets, plus
    loss and accuracy on the answer bytes when there are some.

    `loss_on="answers"` (`data.loss_on`) backpropagates the mean cross-entropy over the answer targets
    only: a retrieval task's few answers would drown in a loss over every token. The metrics are the same
    either way.

    With `sp`, `batch` holds this rank's shard of the replica's sequences. The local loss is the sum
    over local targets divided by the replica's target count, times the sp degree: summed over the
    replica's ranks that is its mean loss (times sp), so the mean of the gradients over all ranks (what
    the gradient all-reduce over the mesh's grad_group computes) is the sum over the sp ranks averaged
    over the replicas. Metrics are summed over the sp group (one small all-reduce).
    """
    per_token = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
    per_token = per_token.view_as(batch.targets)  # (B, T_local)
    ranks = 1 if sp is None else sp.size
    tokens = batch.targets.numel() * ranks
    if loss_on == "answers":
        loss = _answer_loss(per_token, batch.answer_mask, sp)
    else:
        loss = per_token.mean() if sp is None else per_token.sum() * (ranks / tokens)
    detached = per_token.detach().double()
    sums = [detached.sum().reshape(1)]
    mask = batch.answer_mask
    if mask is not None:
        correct = (logits.argmax(-1) == batch.targets) & mask  # (B, T_local)
        sums += [(detached * mask).sum().reshape(1), correct.sum(-1).double(), mask.sum(-1).double()]
    sums = torch.cat(sums)  # (1 [+ 1 + B + B],)
    if sp is not None:
        dist.all_reduce(sums, group=sp.group)
    metrics = {"loss": (sums[0] / tokens).float()}
    if mask is not None:
        rows = batch.targets.shape[0]
        correct_rows, mask_rows = sums[2:2 + rows], sums[2 + rows:]
        metrics["answer_loss"] = (sums[1] / mask_rows.sum()).float()
        metrics["answer_accuracy"] = (correct_rows.sum() / mask_rows.sum()).float()
        metrics["passkey_exact"] = (correct_rows == mask_rows).float().mean()
    return loss, metrics


def _answer_loss(per_token: torch.Tensor, mask: torch.Tensor | None, sp: SequenceParallel | None) -> torch.Tensor:
    """Mean cross-entropy over the replica's answer targets, scaled like the token loss under `sp`."""
    if mask is None:
        raise ValueError("data.loss_on=answers needs a task with answers (data=needle, mqar or passkey); "
                         "use data.loss_on=all for text and token data")
    mask = mask.to(per_token.dtype)
    answers = mask.sum().detach()
    ranks = 1
    if sp is not None:
        # All the answers may sit on one rank's shard: the count is the replica's, not this rank's.
        answers = answers.clone()
        dist.all_reduce(answers, group=sp.group)
        ranks = sp.size
    return (per_token * mask).sum() * ranks / answers.clamp_min(1)
