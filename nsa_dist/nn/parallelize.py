"""`parallelize(model, mesh_or_sp)`: a model whose attention layers run on this rank's sequence shard.

Applied in one fixed order, each step working on what the one before made:
1. sequence-parallel attention: it decides what each layer computes (and, for a converted Hugging
   Face model, which positions its rotary embedding sees);
2. activation checkpointing: it recomputes whatever the layer became, exchanges included;
3. `torch.compile` of each decoder block: it traces the checkpointed, sequence-parallel block;
4. ZeRO: the engine (nsa_dist.training.engine) wraps the returned model and shards its optimizer state (and at
   stage 3 its parameters); it comes last because it owns the parameters from then on.
"""
from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from nsa_dist.nn import hf
from nsa_dist.nn.layer import ATTENTION_LAYERS, NativeSparseAttention
from nsa_dist.parallel import ExchangeLog, Mesh, SequenceParallel


def parallelize(model: nn.Module, mesh_or_sp: Mesh | SequenceParallel | None, *,
                activation_checkpointing: bool = False, compile: bool | dict = False,
                exchange_log: ExchangeLog | None = None) -> nn.Module:
    """Make every attention layer of `model` (NSA: `SparseAttention`, `NativeSparseAttention`, converted
    modules; and `DenseAttention`) run sequence-parallel over `mesh_or_sp`, in place; then checkpoint
    and compile its decoder blocks if asked.

    This is the one way a layer learns of sequence parallelism: each attention layer gets `sp` and
    `exchange_log` as attributes. The model is then called on shards (`nsa_dist.parallel.shard` of its
    inputs) and returns the shard of its outputs; a converted Hugging Face model is handed each shard's
    global positions. Each layer call records its byte counts into `exchange_log` (recomputed layers count
    again); without one nothing is recorded. `parallelize(model, None)` returns it to one process.
    With `activation_checkpointing`, each module that directly holds an attention layer (a decoder
    block) is recomputed in the backward. `compile=True` compiles each such block in place
    (`nn.Module.compile`, so parameter names stay); a dict is passed to it as `torch.compile` options.
    Raises for a model without attention layers, and when `mesh_or_sp` shards the sequence but some
    attention would see only its shard (Hugging Face attention left dense). Returns `model`.
    """
    sp = mesh_or_sp.sequence_parallel if isinstance(mesh_or_sp, Mesh) else mesh_or_sp
    attention = [m for m in model.modules() if isinstance(m, ATTENTION_LAYERS)]
    foreign = [n for n, m in model.named_modules() if hf.is_llama_attention(m)]

    if not attention and not foreign:
        raise ValueError(f"{type(model).__name__} has no NativeSparseAttention (nor other attention nsa_dist knows) "
                         "to parallelize: build its attention from nsa_dist.NativeSparseAttention (or "
                         "nsa_dist.SparseAttention), or convert it with nsa_dist.convert_attention")

    # 1. Sequence-parallel attention: the one way a layer learns of sp, and where its bytes go.
    if sp is not None and foreign:
        raise ValueError(f"cannot run {type(model).__name__} sequence-parallel: its attention {', '.join(foreign)} "
                         "would see only this rank's shard; convert it with nsa_dist.convert_attention first")
    for layer in attention:
        layer.sp, layer.exchange_log = sp, exchange_log
    if hf.is_converted(model):
        hf.supply_global_positions(model, sp)

    # 2. Activation checkpointing, one mechanism for every model: each decoder block is wrapped.
    blocks = _decoder_blocks(model)
    if activation_checkpointing:
        ids = {id(b) for b in blocks}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in ids)
        blocks = _decoder_blocks(model)  # now the checkpoint wrappers, whose forward is the recomputed one

    # 3. Compile, one block at a time: the blocks share their code, and a graph break (the NSA plans'
    # host syncs) stays inside one block.
    if compile:
        options = compile if isinstance(compile, dict) else {}
        for block in blocks:
            block.compile(**options)

    # 4. ZeRO: the engine wraps what is returned here.
    return model


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost module directly above each attention layer: the layer's decoder block, or the
    checkpoint wrapper around it."""
    def is_attention(m):
        return isinstance(m, (NativeSparseAttention, *ATTENTION_LAYERS)) or hf.is_llama_attention(m)

    # NativeSparseAttention holds its NSA core: the block is the module above the outer one
    parents = [p for p in model.modules() if not is_attention(p) and any(is_attention(c) for c in p.children())]
    wrappers = {id(inner): outer for outer in model.modules() for inner in outer.children()
                if type(outer).__name__ == "CheckpointWrapper"}
    return [wrappers.get(id(p), p) for p in parents]
