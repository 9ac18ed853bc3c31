"""nsa_dist.parallel: the dp x sp mesh, the sequence sharded across ranks (zigzag), and the NSA layer
over the shards.

`build_mesh(ParallelConfig(...))` makes the mesh; `mesh.sequence_parallel` holds the sp group;
`shard` / `unshard` move between full and local tensors; `nsa_forward` is the NSA op sequence of one
rank, the whole sequence without `sp` and a shard with it, recording byte counts (and, with
`ExchangeLog(timed=True)`, the seconds of each collective) into an `ExchangeLog` (see docs/parallel.md).
"""
from .attention import local_chunks, nsa_forward
from .exchange import (COLLECTIVES, ExchangeStats, all_gather_bytes, all_gather_compressed, exchange_selected_blocks,
                       gather_sequence_kv)
from .halo import exchange_halo
from .mesh import EXCHANGES, SINGLE_RANK_MESH, Mesh, ParallelConfig, SequenceParallel, build_mesh
from .sharding import check_length, document_positions, global_positions, packed_cu_seqlens, shard, unshard
from .state import ExchangeLog, PlanCache

__all__ = [
    "COLLECTIVES",
    "EXCHANGES",
    "ExchangeLog",
    "ExchangeStats",
    "Mesh",
    "ParallelConfig",
    "PlanCache",
    "SINGLE_RANK_MESH",
    "SequenceParallel",
    "all_gather_bytes",
    "all_gather_compressed",
    "build_mesh",
    "check_length",
    "document_positions",
    "exchange_halo",
    "exchange_selected_blocks",
    "gather_sequence_kv",
    "global_positions",
    "local_chunks",
    "nsa_forward",
    "packed_cu_seqlens",
    "shard",
    "unshard",
]
