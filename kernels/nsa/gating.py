"""The gated sum of the branches, `o = sum_b g_b * o_b`, forward and backward in one pass each."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import p2


@triton.jit
def _gated_sum_fwd_kernel(O1, O2, O3, G1, G2, G3, OUT, n_rows, DV: tl.constexpr, THREE: tl.constexpr,
                          BR: tl.constexpr, BDV: tl.constexpr):
    """out = g1 * o1 + g2 * o2 (+ g3 * o3) per row, in fp32 with one rounding at the end."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BDV)
    r_in = r < n_rows
    at = r[:, None].to(tl.int64) * DV + c[None, :]
    m = r_in[:, None] & (c[None, :] < DV)
    acc = tl.load(G1 + r, mask=r_in, other=0.0).to(tl.float32)[:, None] * tl.load(O1 + at, mask=m, other=0.0).to(tl.float32)
    acc += tl.load(G2 + r, mask=r_in, other=0.0).to(tl.float32)[:, None] * tl.load(O2 + at, mask=m, other=0.0).to(tl.float32)
    if THREE:
        acc += tl.load(G3 + r, mask=r_in, other=0.0).to(tl.float32)[:, None] * tl.load(O3 + at, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + at, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _gated_sum_branch_grad(DO, O, G, DOB, DG, r, r_in, at, m):
    """d o_b = g_b * d out and d g_b = rowsum(d out * o_b) for one branch."""
    g = tl.load(G + r, mask=r_in, other=0.0).to(tl.float32)
    tl.store(DOB + at, (g[:, None] * DO).to(DOB.dtype.element_ty), mask=m)
    tl.store(DG + r, tl.sum(DO * tl.load(O + at, mask=m, other=0.0).to(tl.float32), 1).to(DG.dtype.element_ty),
             mask=r_in)


@triton.jit
def _gated_sum_bwd_kernel(DOUT, O1, O2, O3, G1, G2, G3, DO1, DO2, DO3, DG1, DG2, DG3, n_rows, DV: tl.constexpr,
                          THREE: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BDV)
    r_in = r < n_rows
    at = r[:, None].to(tl.int64) * DV + c[None, :]
    m = r_in[:, None] & (c[None, :] < DV)
    do = tl.load(DOUT + at, mask=m, other=0.0).to(tl.float32)
    _gated_sum_branch_grad(do, O1, G1, DO1, DG1, r, r_in, at, m)
    _gated_sum_branch_grad(do, O2, G2, DO2, DG2, r, r_in, at, m)
    if THREE:
        _gated_sum_branch_grad(do, O3, G3, DO3, DG3, r, r_in, at, m)


def _three(xs):
    """Two or three tensors as three kernel arguments (a missing third is never read: THREE=False)."""
    return xs + [xs[0]] * (3 - len(xs))


class _GatedSum(torch.autograd.Function):
    """`sum_b g_b * o_b` over two or three branches: one pass forward, one backward, no temporaries."""

    @staticmethod
    def forward(ctx, o1, o2, o3, g1, g2, g3):
        outs = [x.contiguous() for x in (o1, o2, o3) if x is not None]
        gates = [x.contiguous() for x in (g1, g2, g3) if x is not None]
        dtype = outs[0].dtype
        for x in outs[1:] + gates:
            dtype = torch.promote_types(dtype, x.dtype)  # as the eager `g[..., None] * o` would give
        out = torch.empty(outs[0].shape, dtype=dtype, device=outs[0].device)
        B, T, HQ, DV = out.shape
        n, BDV, three = B * T * HQ, p2(max(DV, 16)), len(outs) == 3
        BR = max(1, 4096 // BDV)
        if n:
            _gated_sum_fwd_kernel[(triton.cdiv(n, BR),)](*_three(outs), *_three(gates), out, n, DV, THREE=three, BR=BR,
                                                        BDV=BDV, num_warps=4)
        ctx.save_for_backward(*outs, *gates)
        ctx.three = three
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        nb = 3 if ctx.three else 2
        outs, gates = list(saved[:nb]), list(saved[nb:])
        dout = dout.contiguous()
        d_outs = [torch.empty_like(o) for o in outs]
        d_gates = [torch.empty_like(g) for g in gates]
        B, T, HQ, DV = dout.shape
        n, BDV = B * T * HQ, p2(max(DV, 16))
        BR = max(1, 4096 // BDV)
        if n:
            _gated_sum_bwd_kernel[(triton.cdiv(n, BR),)](dout, *_three(outs), *_three(gates), *_three(d_outs),
                                                        *_three(d_gates), n, DV, THREE=ctx.three, BR=BR, BDV=BDV,
                                                        num_warps=4)
        d_outs += [None] * (3 - nb)
        d_gates += [None] * (3 - nb)
        return (*d_outs, *d_gates)


def gated_sum(outputs, gates):
    """`sum_b gates[b][..., None] * outputs[b]` for two or three branches `[B, T, HQ, Dv]`, gates `[B, T, HQ]`."""
    o3, g3 = (outputs[2], gates[2]) if len(outputs) == 3 else (None, None)
    return _GatedSum.apply(outputs[0], outputs[1], o3, gates[0], gates[1], g3)
