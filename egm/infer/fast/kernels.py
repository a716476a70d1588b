"""Triton kernels for decode steps: matrix-vector products and attention over the cache.

At batch 1 a decode step streams every weight once and attends one token to the cache; the
general kernels are shaped for bigger work. On the H200 (`benchmarks/decode_kernels.py`, 8B,
`benchmarks/results/decode-kernels-h200.json`):

- `linear`: the matrix-product library reached 58-76 % of the copy bandwidth on the attention
  and down projections (a step's products: 4.32 ms). Here each program owns a few weight rows,
  walks them along the shared dimension with wide loads and keeps fp32 partial sums in
  registers until one reduction at the end (78-104 %; 3.85 ms). Weights are read once per step
  and not again before the next, so they are loaded with the evict-first hint: the L2 keeps the
  activations and the KV cache instead. The same kernel folds in what surrounds a product in a
  layer (`norm_linear`, `add_linear`, `norm_swiglu_linear`): the RMS norm of its input (its
  weight on the input, its scale on the sums), the SwiGLU of the gate/up product (a program takes
  a gate row and its up row together and writes silu(gate) * up), a residual added to the output.
  A one-token step then launches four kernels fewer per layer (the two norms, the activation, the
  last residual), each of which costs microseconds whatever its size. (Folded into the down
  projection's input instead, the SwiGLU was recomputed by every program of that product over
  its whole input.)
- `decode_attention`: cuDNN's fused attention took 15.6 us a layer for one token against 512
  cached positions (2 MB), all of it start-up and latency, not bytes. Here one program takes a
  (sequence, KV head) pair with that head's query heads together against a chunk of the cache,
  with an online softmax over its blocks of positions (flash-decoding): at batch 1 the cache is
  split into one-block chunks whose softmax partials one small pass merges (7.3 us); at large
  batches each program takes its pair's whole cache and writes the output itself. Given the
  step's last written position it reads no further: the room for the tokens still to come is
  masked anyway, and at batch 64 it is a fifth of the cache a step would otherwise stream.

The products apply to one row (batch 1), the attention to any batch, with contiguous operands;
otherwise each falls back to the library operation, so the same decoder code runs everywhere.
Whether the kernels are used at all is the decoder's choice (`GraphDecoder(use_kernels=...)`,
which takes `KERNELS` or `LIBRARY`): on CUDA by default, on the CPU only under Triton's
interpreter (TRITON_INTERPRET=1), which is how the tests check them. They are registered as
custom ops (`egm::gemv`, `egm::decode_attention`), which `torch.compile` and CUDA graph capture
both take as opaque calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

# (BLOCK_N rows per program, BLOCK_K columns per load, warps, pipeline stages). Of the sweep in
# benchmarks/decode_kernels.py on the H200, the one best over a whole 8B decode step (within
# about 1 % of each shape's own best).
GEMV_CONFIG = (4, 1024, 2, 3)
# Cache positions per attention block (one tl.dot).
ATTENTION_BLOCK = 64
# Programs an attention call aims for: at batch 1 the cache is split into one-block chunks over
# that many programs; from batch 32 on (8 KV heads) each (sequence, KV head) takes its whole cache.
ATTENTION_PROGRAMS = 256


@functools.cache
def _gemv_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, y_ptr, norm_ptr, res_ptr, N, eps, K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RES: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < N
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
        # SwiGLU: w is [gate; up] of 2N rows; a program takes gate row r and up row N + r together,
        # so it can write silu(gate) * up itself.
        up_ptrs = w_ptrs + N.to(tl.int64) * K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            col_ok = k + cols < K
            if K % BLOCK_K == 0:  # rows only: the mask stays constant along a row, so loads stay wide
                mask = row_ok[:, None]
            else:
                mask = row_ok[:, None] & col_ok[None, :]
            w = tl.load(w_ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + k + cols, mask=col_ok, other=0.0).to(tl.float32)
            if NORM:  # RMS norm of x: its weight now, its scale (a scalar per row of x) after the sum
                squares += x * x
                x = x * tl.load(norm_ptr + k + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
            if SWIGLU:
                up = tl.load(up_ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
                acc_up += up.to(tl.float32) * x[None, :]
                up_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        if NORM:
            scale = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
            y = y * scale
        if SWIGLU:
            up_sum = tl.sum(acc_up, axis=1)
            if NORM:
                up_sum = up_sum * scale
            y = y / (1.0 + tl.exp(-y)) * up_sum
        if RES:
            y += tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel


def gemv(x, w, out, config=None, norm_w=None, eps: float = 0.0, residual=None, swiglu: bool = False) -> None:
    """out = residual + f(w @ g(x)), one launch (config: see GEMV_CONFIG), where g(x) is
    rms_norm(x) * norm_w with `norm_w`, else x; f(y) is silu(gate) * up for y = [gate, up] with
    `swiglu` (w of 2N rows, out of N), else y; the residual [N] is optional."""
    n, k = w.shape
    if swiglu:
        n //= 2
    block_n, block_k, warps, stages = config or GEMV_CONFIG
    grid = ((n + block_n - 1) // block_n,)
    _gemv_kernel()[grid](x, w, out, x if norm_w is None else norm_w, x if residual is None else residual, n,
                         float(eps), K=k, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm_w is not None,
                         SWIGLU=bool(swiglu), RES=residual is not None, num_warps=warps, num_stages=stages)


@functools.cache
def _attention_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, last_ptr, m_ptr, l_ptr, acc_ptr, o_ptr, L, scale,
                     KVH: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, G_PAD: tl.constexpr, HD_PAD: tl.constexpr,
                     G_POW2: tl.constexpr, BLOCK: tl.constexpr, PER: tl.constexpr, SPLIT: tl.constexpr,
                     HAS_LAST: tl.constexpr, IEEE: tl.constexpr):
        # One (sequence, KV head) pair (program axis 0) against its chunk of PER blocks of BLOCK
        # cache positions (axis 1), with an online softmax over the blocks (flash-decoding).
        bh = tl.program_id(0)
        chunk = tl.program_id(1)
        seq = bh // KVH
        end = L
        if HAS_LAST:
            # Positions after `last` are masked (not yet written): they are not read at all.
            end = tl.minimum(tl.load(last_ptr).to(tl.int32) + 1, L)
        start = chunk * PER * BLOCK
        stop = tl.minimum(start + PER * BLOCK, end)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD_PAD)
        g_ok, d_ok = g < G, d < HD
        q = tl.load(q_ptr + (bh * G + g[:, None]) * HD + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, HD_PAD], dtype=tl.float32)
        for first in range(start, stop, BLOCK):
            pos = first + tl.arange(0, BLOCK)
            pos_ok = pos < stop
            kv_offsets = (bh.to(tl.int64) * L + pos[:, None]) * HD + d[None, :]
            kv_mask = pos_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            bias = tl.load(bias_ptr + seq * L + pos, mask=pos_ok, other=float("-inf")).to(tl.float32)
            s = s * scale + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # Rows whose positions so far are all masked weigh nothing (exp(-inf) = 0).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - shift[:, None])
            alpha = tl.exp(m_i - shift)
            v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        if SPLIT == 1:
            # The whole cache in one program: its result is the output (the step's own position
            # is never masked, so l_i > 0).
            out = acc / l_i[:, None]
            tl.store(o_ptr + (bh * G + g[:, None]) * HD + d[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=g_ok[:, None] & d_ok[None, :])
        else:
            # A chunk wholly past `last` stores m = -inf, l = 0: the merge gives it no weight.
            row = (bh * SPLIT + chunk) * G_POW2 + g
            row_ok = g < G_POW2
            tl.store(m_ptr + row, m_i, mask=row_ok)
            tl.store(l_ptr + row, l_i, mask=row_ok)
            tl.store(acc_ptr + row[:, None] * HD_PAD + d[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def merge_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, G: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr,
                     G_POW2: tl.constexpr, SPLIT: tl.constexpr):
        # One (sequence, KV head) pair's chunk partials (axis 0) merged into its query heads' outputs.
        bh = tl.program_id(0)
        g = tl.arange(0, G_POW2)
        d = tl.arange(0, HD_PAD)
        top = tl.full([G_POW2], float("-inf"), tl.float32)
        for c in range(SPLIT):
            top = tl.maximum(top, tl.load(m_ptr + (bh * SPLIT + c) * G_POW2 + g))
        # top is finite: the step's own position is never masked.
        num = tl.zeros([G_POW2, HD_PAD], dtype=tl.float32)
        den = tl.zeros([G_POW2], dtype=tl.float32)
        for c in range(SPLIT):
            row = (bh * SPLIT + c) * G_POW2 + g
            w = tl.exp(tl.load(m_ptr + row) - top)
            den += w * tl.load(l_ptr + row)
            num += w[:, None] * tl.load(acc_ptr + row[:, None] * HD_PAD + d[None, :])
        out = num / den[:, None]
        tl.store(o_ptr + (bh * G + g[:, None]) * HD + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(g[:, None] < G) & (d[None, :] < HD))

    return chunk_kernel, merge_kernel


def _pad(n: int, least: int = 1) -> int:
    return max(least, 1 << (int(n) - 1).bit_length())


def attention_split(batch: int, kv_heads: int, length: int, programs: int | None = None) -> tuple[int, int]:
    """(chunks per sequence and KV head, blocks per chunk) for a call: the cache is cut into enough
    chunks for about `programs` programs in all, never more chunks than blocks."""
    blocks = -(-int(length) // ATTENTION_BLOCK)
    wanted = -(-int(programs or ATTENTION_PROGRAMS) // (int(batch) * int(kv_heads)))
    per = -(-blocks // max(1, min(blocks, wanted)))
    return -(-blocks // per), per


def attention(q, k, v, bias, scale: float, out, last=None, programs: int | None = None) -> None:
    """out = softmax(q k^T * scale + bias) v for a decode step: q [B, KVH, G, HD] (query heads
    grouped by their KV head), k and v [B, KVH, L, HD], bias [B, 1, 1, L] additive (0 or -inf).
    `last` (a one-element integer tensor on the device, optional): the last position any row may
    attend; the positions after it must be masked in `bias`, and are then not read."""
    import torch

    chunk_kernel, merge_kernel = _attention_kernels()
    batch, kvh, g, hd = q.shape
    length = k.shape[2]
    split, per = attention_split(batch, kvh, length, programs)
    # tl.dot wants at least 16 rows and columns: the query heads and head dims are padded up.
    g_pad, hd_pad, g_pow2 = _pad(g, 16), _pad(hd, 16), _pad(g)
    partials = batch * kvh * split * g_pow2 if split > 1 else 1
    m = torch.empty(partials, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(partials, hd_pad if split > 1 else 1, dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32  # float32 models get float32 products, not TF32
    chunk_kernel[(batch * kvh, split)](
        q, k, v, bias, last if last is not None else m, m, l, acc, out, length, scale, KVH=kvh, G=g, HD=hd,
        G_PAD=g_pad, HD_PAD=hd_pad, G_POW2=g_pow2, BLOCK=ATTENTION_BLOCK, PER=per, SPLIT=split,
        HAS_LAST=last is not None, IEEE=ieee, num_warps=4)
    if split > 1:
        merge_kernel[(batch * kvh,)](m, l, acc, out, G=g, HD=hd, HD_PAD=hd_pad, G_POW2=g_pow2, SPLIT=split,
                                     num_warps=4)


def register() -> None:
    """Register the custom ops (once). Done eagerly, before any tracing: a registration met while
    `torch.compile` traces the decoder would be traced too."""
    import torch

    global _registered
    if _registered:
        return

    @torch.library.custom_op("egm::gemv", mutates_args=(),
                             schema="(Tensor x, Tensor w, Tensor? norm_w, float eps, Tensor? residual, bool swiglu)"
                                    " -> Tensor")
    def gemv_op(x, w, norm_w, eps, residual, swiglu):
        out = torch.empty(w.shape[0] // 2 if swiglu else w.shape[0], dtype=x.dtype, device=x.device)
        gemv(x, w, out, norm_w=norm_w, eps=eps, residual=residual, swiglu=swiglu)
        return out

    @gemv_op.register_fake
    def _(x, w, norm_w, eps, residual, swiglu):
        return x.new_empty(w.shape[0] // 2 if swiglu else w.shape[0])

    @torch.library.custom_op("egm::decode_attention", mutates_args=(),
                             schema="(Tensor q, Tensor k, Tensor v, Tensor bias, float scale, Tensor? last) -> Tensor")
    def attention_op(q, k, v, bias, scale, last):
        out = torch.empty_like(q)
        attention(q, k, v, bias, scale, out, last)
        return out

    @attention_op.register_fake
    def _(q, k, v, bias, scale, last):
        return torch.empty_like(q)

    _registered = True


_registered = False


def available() -> bool:
    """Whether the kernels can run here: Triton importable (it ships with CUDA builds of torch)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _one_row(x, w, k: int) -> bool:
    """Whether x is a single contiguous row of k values for the matrix-vector kernel."""
    return x.numel() == x.shape[-1] == k and x.is_contiguous() and w.is_contiguous() and w.dtype == x.dtype


def linear(x, w):
    """`F.linear(x, w)` (no bias); a single row goes through the matrix-vector kernel."""
    import torch

    if _one_row(x, w, w.shape[1]):
        return torch.ops.egm.gemv(x.reshape(-1), w, None, 0.0, None, False).view(*x.shape[:-1], w.shape[0])
    return library_linear(x, w)


def norm_linear(x, norm_w, eps: float, w):
    """`F.linear(F.rms_norm(x, ..., norm_w, eps), w)`; a single row in one kernel, the norm's scale
    applied to the sums (rounded once, in float32, where the library rounds the normed row first)."""
    import torch

    if _one_row(x, w, w.shape[1]) and norm_w.is_contiguous():
        return torch.ops.egm.gemv(x.reshape(-1), w, norm_w, eps, None, False).view(*x.shape[:-1], w.shape[0])
    return library_norm_linear(x, norm_w, eps, w)


def add_linear(residual, x, w):
    """`residual + F.linear(x, w)`; a single row in one kernel."""
    import torch

    if _one_row(x, w, w.shape[1]) and residual.is_contiguous() and residual.numel() == w.shape[0]:
        return torch.ops.egm.gemv(x.reshape(-1), w, None, 0.0, residual.reshape(-1), False).view(residual.shape)
    return library_add_linear(residual, x, w)


def norm_swiglu_linear(x, norm_w, eps: float, w):
    """`silu(gate) * up` for [gate, up] = `norm_linear(x, norm_w, eps, w)`; a single row in one kernel."""
    import torch

    if _one_row(x, w, w.shape[1]) and norm_w.is_contiguous() and w.shape[0] % 2 == 0:
        return torch.ops.egm.gemv(x.reshape(-1), w, norm_w, eps, None, True).view(*x.shape[:-1], w.shape[0] // 2)
    return library_norm_swiglu_linear(x, norm_w, eps, w)


def library_linear(x, w):
    import torch.nn.functional as F

    return F.linear(x, w)


def library_norm_linear(x, norm_w, eps: float, w):
    import torch.nn.functional as F

    return F.linear(F.rms_norm(x, (x.shape[-1],), norm_w, eps), w)


def library_add_linear(residual, x, w):
    import torch.nn.functional as F

    return residual + F.linear(x, w)


def library_norm_swiglu_linear(x, norm_w, eps: float, w):
    import torch.nn.functional as F

    gate, up = library_norm_linear(x, norm_w, eps, w).chunk(2, dim=-1)
    return F.silu(gate) * up


def decode_attention(q, k, v, bias, scale: float, last=None):
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)` for a decode step's
    grouped queries (q [B, KVH, G, HD], k/v [B, KVH, L, HD], bias [B, 1, 1, L]) through the kernels;
    `last`: see `attention`."""
    import torch

    if all(t.is_contiguous() for t in (q, k, v, bias)) and bias.numel() == q.shape[0] * k.shape[2]:
        return torch.ops.egm.decode_attention(q, k, v, bias, scale, last)
    return library_attention(q, k, v, bias, scale)


def library_attention(q, k, v, bias, scale: float, last=None):
    """The same step through `F.scaled_dot_product_attention` (`last` is implied by the mask)."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


@dataclass(frozen=True)
class DecodeOps:
    """The products and the attention of a decode step, as one set: the kernels (`KERNELS`, single
    rows through Triton) or the library's (`LIBRARY`, what the model's own forward does)."""

    linear: Callable
    norm_linear: Callable
    add_linear: Callable
    norm_swiglu_linear: Callable
    attention: Callable


KERNELS = DecodeOps(linear, norm_linear, add_linear, norm_swiglu_linear, decode_attention)
LIBRARY = DecodeOps(library_linear, library_norm_linear, library_add_linear, library_norm_swiglu_linear,
                    library_attention)
