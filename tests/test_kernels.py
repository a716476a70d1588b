"""egm.infer.fast.kernels against the library operations they stand in for, run by Triton's
interpreter on the CPU (in a process of its own: it must be chosen before Triton is imported)."""

import json
import os
import subprocess
import sys

import pytest

CHECK = """
import json, torch
import torch.nn.functional as F
from egm.infer.fast import kernels

kernels.register()
torch.manual_seed(0)
out = {"attention": [], "products": []}
# (batch, KV heads, query heads per KV head, head dim, cache length, last written position)
for b, kvh, g, hd, length, last in [(1, 2, 4, 32, 200, 150), (3, 2, 4, 32, 256, 255), (5, 1, 2, 16, 130, 70),
                                    (64, 2, 4, 16, 128, 100)]:
    q = torch.randn(b, kvh, g, hd)
    k, v = torch.randn(b, kvh, length, hd), torch.randn(b, kvh, length, hd)
    bias = torch.zeros(b, 1, 1, length)
    bias[..., last + 1:] = float("-inf")
    bias[0, ..., :3] = float("-inf")  # one row left-padded
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=hd**-0.5)
    whole = kernels.decode_attention(q, k, v, bias, hd**-0.5)
    # Past `last` nothing may be read: poison it.
    k[..., last + 1:, :] = float("nan")
    v[..., last + 1:, :] = float("nan")
    for programs in (1, None, 10**4):  # one chunk per (row, head), the default split, one block each
        o = torch.empty_like(q)
        kernels.attention(q, k, v, bias, hd**-0.5, o, torch.tensor([last]), programs=programs)
        out["attention"].append([b, length, list(kernels.attention_split(b, kvh, length, programs)),
                                 float((o - reference).abs().max()), float((whole - reference).abs().max())])
for n, k in [(48, 64), (37, 100), (130, 2048)]:
    x, w, nw = torch.randn(1, 1, k), torch.randn(n, k) / k**0.5, torch.rand(k) + 0.5
    res, gate_up_w = torch.randn(1, 1, n), torch.randn(2 * n, k) / k**0.5
    for name, ours, theirs in [
            ("linear", kernels.linear(x, w), kernels.library_linear(x, w)),
            ("norm", kernels.norm_linear(x, nw, 1e-6, w), kernels.library_norm_linear(x, nw, 1e-6, w)),
            ("residual", kernels.add_linear(res, x, w), kernels.library_add_linear(res, x, w)),
            ("swiglu", kernels.norm_swiglu_linear(x, nw, 1e-6, gate_up_w),
             kernels.library_norm_swiglu_linear(x, nw, 1e-6, gate_up_w))]:
        out["products"].append([name, n, k, list(ours.shape) == list(theirs.shape),
                                float((ours - theirs).abs().max() / theirs.abs().max())])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def checked():
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_attention_at_every_batch_reads_only_up_to_the_last_written_position(checked):
    """The decode attention equals the library's at batch 1 to 64, with the cache in one chunk or
    split; given the last written position it never reads past it (NaN there would show)."""
    splits = set()
    for batch, length, split, error, whole_error in checked["attention"]:
        assert error < 1e-5, (batch, length, split, error)
        assert whole_error < 1e-5, (batch, length, whole_error)
        splits.add(split[0] > 1)
    assert splits == {True, False}  # both the merged and the single-chunk paths ran


def test_single_row_products_with_their_norm_activation_and_residual_folded_in(checked):
    names = set()
    for name, n, k, same_shape, error in checked["products"]:
        assert same_shape and error < 1e-5, (name, n, k, error)
        names.add(name)
    assert names == {"linear", "norm", "residual", "swiglu"}
