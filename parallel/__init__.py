"""nsa_dist.parallel: the dp x sp mesh, the sequence sharded across ranks (zigzag), and the NSA layer
over the shards.

`build_mesh(ParallelConfig(...))` makes the mesh; `mesh.sequence_parallel` holds the sp group;
`shard` / `unshard` move between full and local tensors; `nsa_forward` is the NSA op sequence of one
rank, the whole sequence without `sp` and a shard with it, recording byte counts (and, with
`ExchangeLog(timed=True)`, the seconds of each collective) into an `ExchangeLog` (see docs/parallel.md).
"""
from .attention import nsa_forward
from .exchange import COLLECTIVES, ExchangeStats, all_gather_compressed, exchange_selected_blocks
from .halo import exchange_halo
from .mesh import EXCHANGES, SINGLE_RANK_MESH, Mesh, ParallelConfig, SequenceParallel, build_mesh
from .sharding import check_length, document_positions, global_positions, shard, unshard
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
    "all_gather_compressed",
    "build_mesh",
    "check_length",
    "document_positions",
    "exchange_halo",
    "exchange_selected_blocks",
    "global_positions",
    "nsa_forward",
    "shard",
    "unshard",
]
