"""Where each token sits: its document and its position inside that document.

Every op addresses tokens by their *global packed index* `g` (0 .. total length). Without
`cu_seqlens` the whole batch row is one document and `g` is the position. With `cu_seqlens`
(packed documents, batch size 1) token `g` belongs to document `j` with
`cu_seqlens[j] <= g < cu_seqlens[j+1]` and sits at position `g - cu_seqlens[j]` inside it.
A tensor that holds a slice of the sequence says where the slice starts (`q_offset`,
`k_offset`), which is how a sequence-parallel rank describes its shard.

Compressed tokens are numbered per document: document `j` has
`num_compressed(len_j) = max(0, (len_j - block_len) // stride + 1)` of them, packed one
document after the other, so `k_cmp` of packed documents is itself packed by `cu_compressed`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def num_compressed(length: int | torch.Tensor, block_len: int, stride: int):
    """Number of compressed tokens of a document of `length` tokens (whole blocks only)."""
    if isinstance(length, torch.Tensor):
        return torch.clamp(torch.div(length - block_len, stride, rounding_mode="floor") + 1, min=0)
    return max(0, (length - block_len) // stride + 1)


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_len: int, stride: int) -> torch.Tensor:
    """Start of each document's compressed tokens in a packed `k_cmp`, `[num_docs + 1]`."""
    counts = num_compressed(cu_seqlens[1:] - cu_seqlens[:-1], block_len, stride)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


@dataclass(frozen=True)
class TokenLayout:
    """Per-token document facts for `length` tokens starting at global index `offset`."""

    doc: torch.Tensor  # [L] int64, document id
    doc_start: torch.Tensor  # [L] int64, global index of the document's first token
    doc_end: torch.Tensor  # [L] int64, global index one past the document's last token
    pos: torch.Tensor  # [L] int64, position inside the document


def token_layout(offset: int, length: int, cu_seqlens: torch.Tensor | None, device) -> TokenLayout:
    g = torch.arange(offset, offset + length, device=device, dtype=torch.int64)
    if cu_seqlens is None:
        zeros = torch.zeros_like(g)
        big = torch.full_like(g, torch.iinfo(torch.int64).max)
        return TokenLayout(doc=zeros, doc_start=zeros, doc_end=big, pos=g)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    doc = torch.searchsorted(cu, g, right=True) - 1
    doc = doc.clamp(0, cu.numel() - 2)
    return TokenLayout(doc=doc, doc_start=cu[doc], doc_end=cu[doc + 1], pos=g - cu[doc])


def compressed_layout(num_cmp: int, block_len: int, stride: int, cu_seqlens: torch.Tensor | None, device):
    """For each of the `num_cmp` compressed tokens: (document id, index inside its document)."""
    i = torch.arange(num_cmp, device=device, dtype=torch.int64)
    if cu_seqlens is None:
        return torch.zeros_like(i), i
    cu_cmp = compressed_cu_seqlens(cu_seqlens.to(device=device, dtype=torch.int64), block_len, stride)
    doc = (torch.searchsorted(cu_cmp, i, right=True) - 1).clamp(0, cu_cmp.numel() - 2)
    return doc, i - cu_cmp[doc]


def compression_blocks(x: torch.Tensor, block_len: int, stride: int, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The key (or value) blocks that compressed tokens summarise.

    x: `[B, T, H, D]` → `[B, Tc, block_len, H, D]`, block `i` = `x[i*stride : i*stride + block_len]`
    of its document; with `cu_seqlens` (B == 1) the blocks of each document are packed in order.
    """
    B, T, H, D = x.shape
    if cu_seqlens is None:
        n = num_compressed(T, block_len, stride)
        starts = torch.arange(n, device=x.device) * stride
    else:
        cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
        starts = torch.cat([
            cu[j] + torch.arange(num_compressed(int(cu[j + 1] - cu[j]), block_len, stride), device=x.device) * stride
            for j in range(cu.numel() - 1)
        ]) if cu.numel() > 1 else torch.zeros(0, dtype=torch.int64, device=x.device)
    gather = starts[:, None] + torch.arange(block_len, device=x.device)[None, :]  # (Tc, l)
    return x[:, gather]  # (B, Tc, l, H, D)
