"""`parallelize(model, mesh_or_sp)`: a model whose NSA layers run on this rank's sequence shard.

Applied in a fixed order: sequence-parallel attention first (it decides what each layer computes),
then activation checkpointing (which recomputes whatever the layer became). The optimizer-state
sharding (ZeRO) comes last, when the engine wraps the returned model (nsa_dist.engine).
"""
from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from nsa_dist.layer import SparseAttention
from nsa_dist.model import NSATransformer
from nsa_dist.parallel import ExchangeLog, Mesh, SequenceParallel


def parallelize(model: nn.Module, mesh_or_sp: Mesh | SequenceParallel | None, *,
                activation_checkpointing: bool = False, exchange_log: ExchangeLog | None = None) -> nn.Module:
    """Make every NSA layer (`SparseAttention`, `NativeSparseAttention` included) in `model` run
    sequence-parallel over `mesh_or_sp`, in place.

    The model is then called on shards (`nsa_dist.parallel.shard` of its inputs) without passing `sp`;
    a call that passes `sp` (or `log`) itself keeps it. Each layer call records its byte counts into
    `exchange_log` (recomputed layers count again); without one nothing is recorded. With
    `activation_checkpointing`, each module that directly holds an NSA layer (a decoder block) is
    recomputed in the backward. Returns `model`.
    """
    sp = mesh_or_sp.sequence_parallel if isinstance(mesh_or_sp, Mesh) else mesh_or_sp
    attention = [m for m in model.modules() if isinstance(m, SparseAttention)]
    if not attention:
        raise ValueError(f"{type(model).__name__} has no NativeSparseAttention layer to parallelize: build its "
                         "attention from nsa_dist.NativeSparseAttention (or nsa_dist.SparseAttention)")
    if sp is not None:
        for layer in attention:
            layer.register_forward_pre_hook(_pass_sequence_parallel(sp, exchange_log), with_kwargs=True)
    if activation_checkpointing:
        if isinstance(model, NSATransformer):
            model.activation_checkpointing = True
        else:
            blocks = {id(parent) for parent in model.modules()
                      if any(isinstance(child, SparseAttention) for child in parent.children())}
            apply_activation_checkpointing(model, check_fn=lambda m: id(m) in blocks)
    return model


def _pass_sequence_parallel(sp: SequenceParallel, log: ExchangeLog | None):
    def hook(module, args, kwargs):
        given = {"sp": sp, "log": log}
        return args, {**kwargs, **{k: v for k, v in given.items() if kwargs.get(k) is None}}

    return hook
