"""Single-process pieces of the sequence-parallel path: partial selection attentions merge exactly."""
import torch

from nsa_dist.kernels import selection_attention, sort_block_ids
from nsa_dist.parallel.attention import merge_partial_attention


def test_selection_attention_over_split_blocks_merges_to_the_whole():
    torch.manual_seed(0)
    B, T, HQ, H, D, l = 1, 96, 6, 2, 16, 16
    q, k, v = torch.randn(B, T, HQ, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    pos = torch.arange(T).view(1, T, 1, 1) // l
    idx = torch.stack([torch.zeros_like(pos), pos - 1, pos, (pos * 7 + 3) % (pos + 1)], -1).squeeze(-2)
    idx = idx.expand(B, T, H, 4).clone()
    idx[idx < 0] = -1
    idx = sort_block_ids(idx.to(torch.int32))
    dup = torch.nn.functional.pad(idx[..., 1:] == idx[..., :-1], (1, 0))
    idx = sort_block_ids(torch.where(dup, -1, idx))  # ids unique per query, as select_blocks gives them
    whole = selection_attention(q, k, v, idx, select_size=l, q_offset=0)
    odd = idx % 2 == 1
    parts = [selection_attention(q, k, v, sort_block_ids(torch.where(m, idx, -1)), select_size=l, return_lse=True)
             for m in (odd, ~odd)]
    merged = merge_partial_attention(parts)
    assert float((merged - whole).norm() / whole.norm()) < 1e-6
    empty = selection_attention(q, k, v, torch.full_like(idx, -1), select_size=l, return_lse=True)
    assert torch.isneginf(empty[1]).all() and (empty[0] == 0).all()

