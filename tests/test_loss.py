"""The loss: the trainer's over every target or the answer targets only (`data.loss_on`), and one sp contract
shared with users' loops (`causal_lm_loss`)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from multirank import run_ranks
from nsa_dist.data.batch import Batch, windows_to_batch
from nsa_dist.nn.layer import NSAConfig
from nsa_dist.nn.model import ModelConfig, NSATransformer
from nsa_dist.parallel import SequenceParallel
from nsa_dist.training.loss import token_metrics

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


def _tiny_model() -> NSATransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
    return NSATransformer(cfg, NSAConfig(block_len=8, stride=4, select_size=8, top_n=3, window=8, backend="torch"))


def _averaged_grad_error(model, expected: dict, world: int) -> float:
    """Relative error of the gradients averaged over the ranks (as DDP, DeepSpeed and nsa_dist's engines
    average them) against `expected`, over all parameters together (some of φ's start at zero)."""
    got, want = [], []
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        got.append(g.flatten() / world)
        want.append(expected[name].flatten())
    got, want = torch.cat(got), torch.cat(want)
    return float((got - want).norm() / want.norm())


def _loss_paths(rank: int, world: int, loss_on: str) -> dict[str, float]:
    """The trainer's path (`token_metrics` on a sharded Batch) and a user loop's (`shard_batch` of a dict +
    `causal_lm_loss`), each on 2 ranks against the same path in one process on the whole sequence."""
    from nsa_dist import causal_lm_loss, parallelize, shard_batch
    from nsa_dist.data.sharding import IGNORE_INDEX

    windows = torch.randint(0, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(1))
    answers = _batch()[1].answer_mask  # (B, T): targets that are answers
    batch = windows_to_batch(windows, answers)
    input_ids = windows[:, :-1]
    # Hugging Face labels sit at the token itself: the answer target t is label t + 1 before the shift.
    labels = input_ids if loss_on == "all" else input_ids.masked_fill(
        ~torch.cat([answers.new_zeros(2, 1), answers[:, :-1]], 1), IGNORE_INDEX)
    sp = SequenceParallel()
    errors = {}

    def trainer_loss(model, sp):
        local = shard_batch(batch, sp)
        return token_metrics(model(local.inputs), local, sp, loss_on=loss_on)[0]

    def user_loss(model, sp):
        local = shard_batch({"input_ids": input_ids, "labels": labels}, sp)
        return causal_lm_loss(model(local["input_ids"]), local["labels"], sp)

    for name, loss_fn in (("trainer", trainer_loss), ("user", user_loss)):
        reference = _tiny_model()
        expected_loss = loss_fn(reference, None)
        expected_loss.backward()
        expected = {n: p.grad for n, p in reference.named_parameters()}
        model = parallelize(_tiny_model(), sp)
        loss = loss_fn(model, sp)
        loss.backward()
        errors[f"{name}_value"] = abs(loss.item() - expected_loss.item())
        errors[f"{name}_grad"] = _averaged_grad_error(model, expected, world)
    return errors


def test_trainer_and_user_loop_share_one_loss_contract_under_sequence_parallelism():
    """One contract: on 2 ranks the loss value is the replica's on every rank, and the gradients averaged
    over the ranks equal one process's, by the trainer's path and a user loop's alike."""
    for loss_on in ("all", "answers"):
        for errors in run_ranks(_loss_paths, 2, loss_on):
            assert errors["trainer_value"] < 1e-5 and errors["user_value"] < 1e-5, (loss_on, errors)
            assert errors["trainer_grad"] < 1e-5 and errors["user_grad"] < 1e-5, (loss_on, errors)
