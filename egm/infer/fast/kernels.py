"""Triton kernels for batch-1 decode steps: matrix-vector products and attention over the cache.

At batch 1 a decode step streams every weight once and attends one token to the cache; the
general kernels are shaped for bigger work. On the H200 (`benchmarks/decode_kernels.py`, 8B,
`benchmarks/results/decode-kernels-h200.json`):

- `linear`: the matrix-product library reached 58-76 % of the copy bandwidth on the attention
  and down projections (a step's products: 4.32 ms). Here each program owns a few weight rows,
  walks them along the shared dimension with wide loads and keeps fp32 partial sums in
  registers until one reduction at the end (78-104 %; 3.85 ms). Weights are read once per step
  and not again before the next, so they are loaded with the evict-first hint: the L2 keeps the
  activations and the KV cache instead.
- `decode_attention`: cuDNN's fused attention took 15.6 us a layer for one token against 512
  cached positions (2 MB), all of it start-up and latency, not bytes. Here the cache is split
  into blocks of positions, one program per (KV head, block) with the KV head's query heads
  together (flash-decoding), then one small pass merges the blocks' softmax partials: 7.3 us.

Each applies to one sequence (batch 1) with contiguous operands and falls back to the torch
operation otherwise, so the same decoder code runs everywhere; whether the kernels are used at
all is the decoder's choice (`GraphDecoder(use_kernels=...)`): on CUDA by default, on the CPU only
under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them. They are
registered as custom ops (`egm::gemv`, `egm::decode_attention`), which `torch.compile` and CUDA
graph capture both take as opaque calls.
"""

from __future__ import annotations

import functools

# (BLOCK_N rows per program, BLOCK_K columns per load, warps, pipeline stages). Of the sweep in
# benchmarks/decode_kernels.py on the H200, the one best over a whole 8B decode step (within
# about 1 % of each shape's own best).
GEMV_CONFIG = (4, 1024, 2, 3)
# Cache positions per attention program.
ATTENTION_BLOCK = 64


@functools.cache
def _gemv_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < N
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if K % BLOCK_K == 0:
                w = tl.load(w_ptrs, mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptr + k + cols)
            else:
                col_ok = k + cols < K
                w = tl.load(w_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptr + k + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel


def gemv(x, w, out, config=None) -> None:
    """out[N] = w[N, K] @ x[K], one launch (config: see GEMV_CONFIG)."""
    n, k = w.shape
    block_n, block_k, warps, stages = config or GEMV_CONFIG
    grid = ((n + block_n - 1) // block_n,)
    _gemv_kernel()[grid](x, w, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


@functools.cache
def _attention_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def blocks_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, m_ptr, l_ptr, acc_ptr, L, scale,
                      G: tl.constexpr, HD: tl.constexpr, G_PAD: tl.constexpr, HD_PAD: tl.constexpr,
                      BLOCK: tl.constexpr, IEEE: tl.constexpr):
        # One KV head h (program axis 0) against cache positions [block * BLOCK, +BLOCK) (axis 1).
        h = tl.program_id(0)
        block = tl.program_id(1)
        blocks = tl.num_programs(1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD_PAD)
        pos = block * BLOCK + tl.arange(0, BLOCK)
        g_ok, d_ok, pos_ok = g < G, d < HD, pos < L
        q = tl.load(q_ptr + (h * G + g[:, None]) * HD + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        kv_offsets = (h.to(tl.int64) * L + pos[:, None]) * HD + d[None, :]
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        bias = tl.load(bias_ptr + pos, mask=pos_ok, other=float("-inf")).to(tl.float32)
        s = s * scale + bias[None, :]
        m = tl.max(s, axis=1)
        # A block whose positions are all masked: its partial weighs nothing (exp(-inf) = 0).
        p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v)
        row = (h * blocks + block) * G_PAD + g
        tl.store(m_ptr + row, m)
        tl.store(l_ptr + row, tl.sum(p, axis=1))
        tl.store(acc_ptr + row[:, None] * HD_PAD + d[None, :], acc)

    @triton.jit
    def merge_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, G: tl.constexpr, HD: tl.constexpr, G_PAD: tl.constexpr,
                     HD_PAD: tl.constexpr, G_POW2: tl.constexpr, BLOCKS: tl.constexpr):
        # One KV head's block partials (axis 0) merged into its query heads' outputs.
        h = tl.program_id(0)
        g = tl.arange(0, G_POW2)
        d = tl.arange(0, HD_PAD)
        top = tl.full([G_POW2], float("-inf"), tl.float32)
        for b in range(BLOCKS):
            top = tl.maximum(top, tl.load(m_ptr + (h * BLOCKS + b) * G_PAD + g))
        # top is finite: the step's own position is never masked.
        num = tl.zeros([G_POW2, HD_PAD], dtype=tl.float32)
        den = tl.zeros([G_POW2], dtype=tl.float32)
        for b in range(BLOCKS):
            row = (h * BLOCKS + b) * G_PAD + g
            w = tl.exp(tl.load(m_ptr + row) - top)
            den += w * tl.load(l_ptr + row)
            num += w[:, None] * tl.load(acc_ptr + row[:, None] * HD_PAD + d[None, :])
        out = num / den[:, None]
        tl.store(o_ptr + (h * G + g[:, None]) * HD + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(g[:, None] < G) & (d[None, :] < HD))

    return blocks_kernel, merge_kernel


def _pad(n: int, least: int = 1) -> int:
    return max(least, 1 << (int(n) - 1).bit_length())


def attention(q, k, v, bias, scale: float, out) -> None:
    """out = softmax(q k^T * scale + bias) v for one sequence: q [1, KVH, G, HD] (query heads grouped
    by their KV head), k and v [1, KVH, L, HD], bias [1, 1, 1, L] additive (0 or -inf)."""
    import torch

    blocks_kernel, merge_kernel = _attention_kernels()
    _, kvh, g, hd = q.shape
    length = k.shape[2]
    blocks = -(-length // ATTENTION_BLOCK)
    # tl.dot wants at least 16 rows and columns: the query heads and head dims are padded up.
    g_pad, hd_pad = _pad(g, 16), _pad(hd, 16)
    m = torch.empty(kvh * blocks * g_pad, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(kvh * blocks * g_pad, hd_pad, dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32  # float32 models get float32 products, not TF32
    blocks_kernel[(kvh, blocks)](q, k, v, bias, m, l, acc, length, scale, G=g, HD=hd, G_PAD=g_pad, HD_PAD=hd_pad,
                                 BLOCK=ATTENTION_BLOCK, IEEE=ieee, num_warps=4)
    merge_kernel[(kvh,)](m, l, acc, out, G=g, HD=hd, G_PAD=g_pad, HD_PAD=hd_pad, G_POW2=_pad(g), BLOCKS=blocks,
                         num_warps=4)


def register() -> None:
    """Register the custom ops (once). Done eagerly, before any tracing: a registration met while
    `torch.compile` traces the decoder would be traced too."""
    import torch

    global _registered
    if _registered:
        return

    @torch.library.custom_op("egm::gemv", mutates_args=(), schema="(Tensor x, Tensor w) -> Tensor")
    def gemv_op(x, w):
        out = torch.empty(w.shape[0], dtype=x.dtype, device=x.device)
        gemv(x, w, out)
        return out

    @gemv_op.register_fake
    def _(x, w):
        return x.new_empty(w.shape[0])

    @torch.library.custom_op("egm::decode_attention", mutates_args=(),
                             schema="(Tensor q, Tensor k, Tensor v, Tensor bias, float scale) -> Tensor")
    def attention_op(q, k, v, bias, scale):
        out = torch.empty_like(q)
        attention(q, k, v, bias, scale, out)
        return out

    @attention_op.register_fake
    def _(q, k, v, bias, scale):
        return torch.empty_like(q)

    _registered = True


_registered = False


def available() -> bool:
    """Whether the kernels can run here: Triton importable (it ships with CUDA builds of torch)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def linear(x, w):
    """`F.linear(x, w)` (no bias); a single row goes through the matrix-vector kernel."""
    import torch
    import torch.nn.functional as F

    if x.numel() == x.shape[-1] == w.shape[1] and x.is_contiguous() and w.is_contiguous() and w.dtype == x.dtype:
        return torch.ops.egm.gemv(x.reshape(-1), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def decode_attention(q, k, v, bias, scale: float):
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)` for a decode step's
    grouped queries (q [B, KVH, G, HD], k/v [B, KVH, L, HD]); one sequence goes through the kernels."""
    import torch
    import torch.nn.functional as F

    if q.shape[0] == 1 and all(t.is_contiguous() for t in (q, k, v, bias)) and bias.numel() == k.shape[2]:
        return torch.ops.egm.decode_attention(q, k, v, bias, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
