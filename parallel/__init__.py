"""nsa_dist.parallel: the sequence sharded across ranks (zigzag), and the NSA layer over the shards.

`SequenceParallel` holds the group; `shard` / `unshard` move between full and local tensors;
`NativeSparseAttention.forward(x, sp=sp)` runs the layer on a shard (see docs/parallel.md).
"""
from .attention import sequence_parallel_nsa
from .exchange import ExchangeStats, all_gather_compressed, exchange_selected_blocks
from .halo import exchange_halo
from .mesh import EXCHANGES, SequenceParallel
from .sharding import check_length, global_positions, shard, unshard

__all__ = [
    "EXCHANGES",
    "ExchangeStats",
    "SequenceParallel",
    "all_gather_compressed",
    "check_length",
    "exchange_halo",
    "exchange_selected_blocks",
    "global_positions",
    "sequence_parallel_nsa",
    "shard",
    "unshard",
]
