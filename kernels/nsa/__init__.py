"""Native Sparse Attention ops (see README.md beside this file for the math)."""
from .api import (
    BACKENDS,
    compressed_attention,
    gated_sum,
    nsa_attention,
    select_blocks,
    selection_attention,
    window_attention,
)
from .layout import TokenLayout, compressed_cu_seqlens, compression_blocks, num_compressed, token_layout
from .naive import sort_block_ids

__all__ = [
    "BACKENDS",
    "compressed_attention",
    "compressed_cu_seqlens",
    "compression_blocks",
    "gated_sum",
    "nsa_attention",
    "num_compressed",
    "select_blocks",
    "sort_block_ids",
    "selection_attention",
    "TokenLayout",
    "token_layout",
    "window_attention",
]
