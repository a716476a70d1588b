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
  split into one-block chunks, whose softmax partials the pair's last chunk to finish merges
  (7.3 us with the merge as a kernel of its own); at large batches each program takes its pair's
  whole cache and writes the output itself. Given the step's last written position it reads no
  further: the room for the tokens still to come is masked anyway, and at batch 64 it is a fifth
  of the cache a step would otherwise stream; nor does it read a row's left padding. It starts
  from the QKV product: the new token's per-head RMS norms and rope are done in the kernel, which
  also writes the new key and value into the cache, so a layer's attention is one launch where it
  was three (the norms and rope, the cache write, the attention) or four (7.7 us a layer on the
  H100 over 512 positions, `decode-kernels-h100.json`).
- `advance`: a step's bookkeeping after its argmax (the token stored, the stop check, positions
  moved on) in one launch, where the library's operations took up to eight.

The products apply to one row (batch 1), the attention to any batch, with contiguous operands;
otherwise each falls back to the library operation, so the same decoder code runs everywhere.
Whether the kernels are used at all is the decoder's choice (`GraphDecoder(use_kernels=...)`,
which takes `KERNELS` or `LIBRARY`): on CUDA by default, on the CPU only under Triton's
interpreter (TRITON_INTERPRET=1), which is how the tests check them. They are registered as
custom ops (`egm::gemv`, `egm::decode_attention`, `egm::advance`), which `torch.compile` and CUDA
graph capture both take as opaque calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

# (BLOCK_N rows per program, BLOCK_K columns per load, warps, pipeline stages). Of the sweep in
# benchmarks/decode_kernels.py on the H200, the one best over a whole 8B decode step (within
# about 1 % of each shape's own best).
GEMV_CONFIG = (4, 1024, 2, 3)
# An attention program's launch: (cache positions per block (one tl.dot), warps, pipeline stages).
ATTENTION_CONFIG = (64, 4, 3)
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
    def block_kernel(qkv_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, bias_ptr, last_ptr, first_ptr,
                     m_ptr, l_ptr, acc_ptr, count_ptr, o_ptr, L, scale, eps, KVH: tl.constexpr, G: tl.constexpr,
                     HD: tl.constexpr, G_PAD: tl.constexpr, HD_PAD: tl.constexpr, G_POW2: tl.constexpr,
                     BLOCK: tl.constexpr, PER: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
        # One (sequence, KV head) pair (program axis 0) against its chunk of PER blocks of BLOCK
        # cache positions (axis 1), with an online softmax over the blocks (flash-decoding).
        bh = tl.program_id(0)
        chunk = tl.program_id(1)
        seq = bh // KVH
        head = bh % KVH
        last = tl.load(last_ptr).to(tl.int32)
        # Positions after `last` are masked (not yet written), those before the row's `first` are
        # its left padding: neither is read. Blocks and chunks count from `first`, so a row's sums
        # do not depend on how much padding its batch gave it.
        start = tl.load(first_ptr + seq).to(tl.int32) + chunk * PER * BLOCK
        stop = tl.minimum(start + PER * BLOCK, tl.minimum(last + 1, L))
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD_PAD)
        g_ok, d_ok = g < G, d < HD
        dtype = k_ptr.dtype.element_ty
        # The new token's q and k: per-head RMS norm, then rope, in float32, rounded once. rope's
        # rotate_half takes element d + HD/2 (negated) for the first half, d - HD/2 for the second.
        half = HD // 2
        rot = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        cos = tl.load(cos_ptr + seq * HD + d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + seq * HD + d, mask=d_ok, other=0.0).to(tl.float32) * sign
        row = qkv_ptr + seq.to(tl.int64) * ((KVH * G + 2 * KVH) * HD)
        q_mask = g_ok[:, None] & d_ok[None, :]
        q_at = row + (head * G + g[:, None]) * HD
        qx = tl.load(q_at + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        qr = tl.load(q_at + rot[None, :], mask=q_mask, other=0.0).to(tl.float32)
        qw = tl.load(q_norm_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        qwr = tl.load(q_norm_ptr + rot, mask=d_ok, other=0.0).to(tl.float32)
        q_scale = 1.0 / tl.sqrt(tl.sum(qx * qx, axis=1) / HD + eps)
        q = (q_scale[:, None] * (qx * (qw * cos)[None, :] + qr * (qwr * sin)[None, :])).to(dtype)
        k_at = row + (KVH * G + head) * HD
        kx = tl.load(k_at + d, mask=d_ok, other=0.0).to(tl.float32)
        kr = tl.load(k_at + rot, mask=d_ok, other=0.0).to(tl.float32)
        kw = tl.load(k_norm_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        kwr = tl.load(k_norm_ptr + rot, mask=d_ok, other=0.0).to(tl.float32)
        k_scale = 1.0 / tl.sqrt(tl.sum(kx * kx, axis=0) / HD + eps)
        k_new = (k_scale * (kx * kw * cos + kr * kwr * sin)).to(dtype)
        v_new = tl.load(row + (KVH * G + KVH + head) * HD + d, mask=d_ok, other=0.0).to(dtype)
        # The first chunk writes the new token into the cache; every chunk uses it at `last` as it
        # has it, whatever it reads there, so no chunk waits for another's write.
        if chunk == 0:
            at = (bh.to(tl.int64) * L + last) * HD + d
            tl.store(k_ptr + at, k_new, mask=d_ok)
            tl.store(v_ptr + at, v_new, mask=d_ok)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, HD_PAD], dtype=tl.float32)
        for first in range(start, stop, BLOCK):
            pos = first + tl.arange(0, BLOCK)
            pos_ok = pos < stop
            is_new = (pos == last)[:, None]
            kv_offsets = (bh.to(tl.int64) * L + pos[:, None]) * HD + d[None, :]
            kv_mask = pos_ok[:, None] & d_ok[None, :]
            k = tl.where(is_new, k_new[None, :], tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0))
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
            v = tl.where(is_new, v_new[None, :], tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0))
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
            # A chunk wholly past `last` (or wholly padding) stores m = -inf, l = 0: the merge
            # gives it no weight.
            row = (bh * SPLIT + chunk) * G_POW2 + g
            row_ok = g < G_POW2
            tl.store(m_ptr + row, m_i, mask=row_ok)
            tl.store(l_ptr + row, l_i, mask=row_ok)
            tl.store(acc_ptr + row[:, None] * HD_PAD + d[None, :], acc, mask=row_ok[:, None])
            # The pair's last chunk to finish merges the partials, so the merge costs no launch of
            # its own: the stores above are released (every thread's, after the barrier) before the
            # count, and acquired by the merging chunk before it reads them (from L2: a previous
            # call's partials may linger at the same addresses in this SM's L1).
            tl.debug_barrier()
            if tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                gm = tl.arange(0, G_POW2)
                top = tl.full([G_POW2], float("-inf"), tl.float32)
                for c in range(SPLIT):
                    top = tl.maximum(top, tl.load(m_ptr + (bh * SPLIT + c) * G_POW2 + gm, cache_modifier=".cg"))
                # top is finite: the step's own position is never masked.
                num = tl.zeros([G_POW2, HD_PAD], dtype=tl.float32)
                den = tl.zeros([G_POW2], dtype=tl.float32)
                for c in range(SPLIT):
                    part = (bh * SPLIT + c) * G_POW2 + gm
                    w = tl.exp(tl.load(m_ptr + part, cache_modifier=".cg") - top)
                    den += w * tl.load(l_ptr + part, cache_modifier=".cg")
                    num += w[:, None] * tl.load(acc_ptr + part[:, None] * HD_PAD + d[None, :], cache_modifier=".cg")
                out = num / den[:, None]
                tl.store(o_ptr + (bh * G + gm[:, None]) * HD + d[None, :], out.to(o_ptr.dtype.element_ty),
                         mask=(gm[:, None] < G) & (d[None, :] < HD))
                tl.store(count_ptr + bh, 0)  # ready for the next call

    return block_kernel


def _pad(n: int, least: int = 1) -> int:
    return max(least, 1 << (int(n) - 1).bit_length())


def attention_split(batch: int, kv_heads: int, length: int, programs: int | None = None,
                    block: int | None = None) -> tuple[int, int]:
    """(chunks per sequence and KV head, blocks per chunk) for a call: the cache is cut into enough
    chunks for about `programs` programs in all, never more chunks than blocks of `block` positions."""
    blocks = -(-int(length) // int(block or ATTENTION_CONFIG[0]))
    wanted = -(-int(programs or ATTENTION_PROGRAMS) // (int(batch) * int(kv_heads)))
    per = -(-blocks // max(1, min(blocks, wanted)))
    return -(-blocks // per), per


def attention(qkv, q_norm_w, k_norm_w, cos, sin, eps: float, kv, bias, scale: float, out, last, first, counts=None,
              programs: int | None = None, config: tuple[int, int, int] | None = None) -> None:
    """One decode step's attention in one layer, from the QKV product on: `out` [B, KVH, G, HD]
    (query heads grouped by their KV head) = softmax(q k^T * scale + bias) v over the cache, where
    q and the new k are the QKV product's heads through their RMS norms (`q_norm_w`, `k_norm_w`)
    and rope (`cos`, `sin` [B, HD]); the new k and v are written into the cache at `last`.

    qkv [B, (KVH * G + 2 * KVH) * HD]; kv [2, B, KVH, L, HD] (keys, values); bias [B, 1, 1, L]
    additive (0 or -inf), already 0 at `last`; `last` (a one-element integer tensor): the position
    written now, after which the bias must mask and nothing is read; `first` [B] integers: where
    each row's unmasked positions begin (nothing before is read); `counts`: B * KVH int32
    zeros, left zero (how many chunks of each pair are done; made here when not given). `programs`
    and `config` (see ATTENTION_PROGRAMS, ATTENTION_CONFIG) are for benchmarks/decode_kernels.py."""
    import torch

    block_kernel = _attention_kernels()
    _, batch, kvh, length, hd = kv.shape
    g = qkv.shape[-1] // hd // kvh - 2
    block, warps, stages = config or ATTENTION_CONFIG
    split, per = attention_split(batch, kvh, length, programs, block)
    # tl.dot wants at least 16 rows and columns: the query heads and head dims are padded up.
    g_pad, hd_pad, g_pow2 = _pad(g, 16), _pad(hd, 16), _pad(g)
    partials = batch * kvh * split * g_pow2 if split > 1 else 1
    m = torch.empty(partials, dtype=torch.float32, device=qkv.device)
    l = torch.empty_like(m)
    acc = torch.empty(partials, hd_pad if split > 1 else 1, dtype=torch.float32, device=qkv.device)
    if counts is None:
        counts = torch.zeros(batch * kvh, dtype=torch.int32, device=qkv.device)
    ieee = kv.dtype == torch.float32  # float32 models get float32 products, not TF32
    block_kernel[(batch * kvh, split)](
        qkv, q_norm_w, k_norm_w, cos, sin, kv[0], kv[1], bias, last, first, m, l, acc, counts, out, length, scale,
        float(eps), KVH=kvh, G=g, HD=hd, G_PAD=g_pad, HD_PAD=hd_pad, G_POW2=g_pow2, BLOCK=block, PER=per,
        SPLIT=split, IEEE=ieee, num_warps=warps, num_stages=stages)


@functools.cache
def _advance_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def advance_kernel(next_ptr, out_ptr, step_ptr, done_ptr, eos_ptr, token_ptr, position_ptr, write_at_ptr, B,
                       OUT_LEN, N_EOS: tl.constexpr, BLOCK_B: tl.constexpr):
        rows = tl.arange(0, BLOCK_B)
        ok = rows < B
        nxt = tl.load(next_ptr + rows, mask=ok, other=0)
        step = tl.load(step_ptr)
        write_at = tl.load(write_at_ptr)
        if N_EOS > 0:
            hit = tl.zeros([BLOCK_B], dtype=tl.int1)
            for e in range(N_EOS):
                hit = hit | (nxt == tl.load(eos_ptr + e))
            done = tl.load(done_ptr + rows, mask=ok, other=0) != 0
            tl.store(done_ptr + rows, (done | hit).to(tl.int8), mask=ok)
        position = tl.load(position_ptr + rows, mask=ok, other=0)
        tl.debug_barrier()  # every counter read before any is written
        tl.store(out_ptr + rows * OUT_LEN + step, nxt, mask=ok)
        tl.store(token_ptr + rows, nxt, mask=ok)
        tl.store(position_ptr + rows, position + 1, mask=ok)
        tl.store(step_ptr, step + 1)
        tl.store(write_at_ptr, write_at + 1)

    return advance_kernel


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

    @torch.library.custom_op("egm::decode_attention", mutates_args=("kv", "counts"),
                             schema="(Tensor qkv, Tensor q_norm_w, Tensor k_norm_w, Tensor cos, Tensor sin, float eps,"
                                    " Tensor(a!) kv, Tensor bias, float scale, Tensor last, Tensor first,"
                                    " Tensor(b!) counts) -> Tensor")
    def attention_op(qkv, q_norm_w, k_norm_w, cos, sin, eps, kv, bias, scale, last, first, counts):
        _, batch, kvh, _, hd = kv.shape
        out = qkv.new_empty(batch, kvh, qkv.shape[-1] // hd // kvh - 2, hd)
        attention(qkv, q_norm_w, k_norm_w, cos, sin, eps, kv, bias, scale, out, last, first, counts)
        return out

    @attention_op.register_fake
    def _(qkv, q_norm_w, k_norm_w, cos, sin, eps, kv, bias, scale, last, first, counts):
        _, batch, kvh, _, hd = kv.shape
        return qkv.new_empty(batch, kvh, qkv.shape[-1] // hd // kvh - 2, hd)

    @torch.library.custom_op("egm::advance", mutates_args=("out", "step", "done", "token", "position", "write_at"),
                             schema="(Tensor nxt, Tensor(a!) out, Tensor(b!) step, Tensor(c!) done, Tensor? eos,"
                                    " Tensor(d!) token, Tensor(e!) position, Tensor(f!) write_at) -> ()")
    def advance_op(nxt, out, step, done, eos, token, position, write_at):
        batch = nxt.shape[0]
        _advance_kernel()[(1,)](nxt, out, step, done.view(torch.int8), eos if eos is not None else nxt, token, position,
                                write_at, batch, out.shape[1], N_EOS=0 if eos is None else eos.numel(),
                                BLOCK_B=_pad(batch), num_warps=1)

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


def decode_attention(qkv, q_norm_w, k_norm_w, cos, sin, eps: float, kv, bias, scale: float, last, first, counts):
    """One decode step's attention from the QKV product on (see `attention`): the new token's q and k
    normed and roped, k and v written into the cache `kv` at `last`, the output [B, KVH, G, HD], in one
    kernel."""
    import torch

    if all(t.is_contiguous() for t in (qkv, cos, sin, kv, bias)) and bias.numel() == kv.shape[1] * kv.shape[3]:
        return torch.ops.egm.decode_attention(qkv, q_norm_w, k_norm_w, cos, sin, eps, kv, bias, scale, last, first,
                                              counts)
    return library_attention(qkv, q_norm_w, k_norm_w, cos, sin, eps, kv, bias, scale, last)


def library_attention(qkv, q_norm_w, k_norm_w, cos, sin, eps: float, kv, bias, scale: float, last, first=None,
                      counts=None):
    """The same step through the library's operations, as the model's own layer does it: per-head
    RMS norms, rope, the cache write, `F.scaled_dot_product_attention` (`first` is implied by the
    mask; `counts` is the kernel's)."""
    import torch
    import torch.nn.functional as F

    from egm.infer.fast.prefill import rotate_half

    _, b, kvh, _, hd = kv.shape
    nh = qkv.shape[-1] // hd - 2 * kvh
    q, k, v = qkv.view(b, -1).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
    cos, sin = cos.view(b, 1, hd), sin.view(b, 1, hd)
    q = F.rms_norm(q.view(b, nh, hd), (hd,), q_norm_w, eps)
    k = F.rms_norm(k.view(b, kvh, hd), (hd,), k_norm_w, eps)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    kv.index_copy_(3, last, torch.stack((k.view(b, kvh, 1, hd), v.view(b, kvh, 1, hd))))
    # The query heads of one KV head as that head's rows: grouped-query attention without copies.
    return F.scaled_dot_product_attention(q.view(b, kvh, nh // kvh, hd), kv[0], kv[1], attn_mask=bias, scale=scale)


def advance(nxt, out, step, done, eos, token, position, write_at) -> None:
    """The bookkeeping after a decode step's argmax `nxt` [B], in one launch (see `library_advance`)."""
    import torch

    if all(t.is_contiguous() for t in (nxt, out, done, token, position)):
        torch.ops.egm.advance(nxt, out, step, done, eos, token, position, write_at)
    else:
        library_advance(nxt, out, step, done, eos, token, position, write_at)


def library_advance(nxt, out, step, done, eos, token, position, write_at) -> None:
    """After a decode step's argmax `nxt` [B]: it goes into column `step` of `out` [B, n]; rows whose
    token is one of `eos` (None: no stop ids) are marked `done`; it becomes the next step's `token`;
    `position`, `write_at` and `step` move on by one."""
    import torch

    out.index_copy_(1, step, nxt.view(-1, 1))
    if eos is not None:
        done |= torch.isin(nxt, eos)
    token.copy_(nxt)
    position.add_(1)
    write_at.add_(1)
    step.add_(1)


@dataclass(frozen=True)
class DecodeOps:
    """The products and the attention of a decode step, as one set: the kernels (`KERNELS`, single
    rows through Triton) or the library's (`LIBRARY`, what the model's own forward does)."""

    linear: Callable
    norm_linear: Callable
    add_linear: Callable
    norm_swiglu_linear: Callable
    attention: Callable
    advance: Callable


KERNELS = DecodeOps(linear, norm_linear, add_linear, norm_swiglu_linear, decode_attention, advance)
LIBRARY = DecodeOps(library_linear, library_norm_linear, library_add_linear, library_norm_swiglu_linear,
                    library_attention, library_advance)
