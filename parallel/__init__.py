"""nsa_dist.parallel: the dp x sp mesh, the sequence sharded across ranks (zigzag), and the NSA layer
over the shards.

`build_mesh(ParallelConfig(...))` makes the mesh; `mesh.sequence_parallel` holds the sp group;
`shard` / `unshard` move between full and local tensors; `NativeSparseAttention.forward(x, sp=sp)`
runs the layer on a shard, recording its byte counts into an `ExchangeLog` (see docs/parallel.md).
"""
from .attention import sequence_parallel_nsa
from .exchange import ExchangeStats, all_gather_compressed, exchange_selected_blocks
from .halo import exchange_halo
from .mesh import EXCHANGES, SINGLE_RANK_MESH, Mesh, ParallelConfig, SequenceParallel, build_mesh
from .sharding import check_length, global_positions, shard, unshard
from .state import ExchangeLog, PlanCache

__all__ = [
    "EXCHANGES",
    "ExchangeLog",
    "ExchangeStats",
    "Mesh",
    "ParallelConfig",
    "PlanCache",
    "SINGLE_RANK_MESH",
    "SequenceParallel",
    "all_gather_compressed",
    "build_mesh",
    "check_length",
    "exchange_halo",
    "exchange_selected_blocks",
    "global_positions",
    "sequence_parallel_nsa",
    "shard",
    "unshard",
]
