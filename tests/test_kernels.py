"""egm.infer.fast.kernels against the library operations they stand in for, run by Triton's
interpreter on the CPU (in a process of its own: it must be chosen before Triton is imported)."""

import json
import os
import subprocess
import sys

import pytest

CHECK = """
import json, torch
from egm.infer.fast import kernels

kernels.register()
torch.manual_seed(0)
out = {"attention": [], "products": []}
# (batch, KV heads, query heads per KV head, head dim, cache length, last written position)
for b, kvh, g, hd, length, last in [(1, 2, 4, 32, 200, 150), (3, 2, 4, 32, 256, 255), (5, 1, 2, 16, 130, 70),
                                    (64, 2, 4, 16, 128, 100)]:
    qkv = torch.randn(b, (kvh * g + 2 * kvh) * hd)
    q_norm_w, k_norm_w = torch.rand(hd) + 0.5, torch.rand(hd) + 0.5
    angle = torch.rand(b, hd // 2) * 6
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    kv = torch.randn(2, b, kvh, length, hd)
    bias = torch.zeros(b, 1, 1, length)
    bias[..., last + 1:] = float("-inf")
    first = torch.zeros(b, dtype=torch.long)
    first[0] = 3 if b < 5 else 70  # one row left-padded: by less than a block, or by more
    bias[0, ..., :first[0]] = float("-inf")
    expected_kv = kv.clone()
    reference = kernels.library_attention(qkv, q_norm_w, k_norm_w, cos, sin, 1e-6, expected_kv, bias, hd**-0.5,
                                          torch.tensor([last]))
    args = (qkv, q_norm_w, k_norm_w, cos, sin, 1e-6)
    # What must not be read: past `last`, the new token's own slot (it is written, and used as
    # written), and row 0's left padding. NaN there would show.
    kv[:, :, :, last:] = float("nan")
    kv[:, 0, :, : first[0]] = float("nan")
    counts = torch.zeros(b * kvh, dtype=torch.int32)  # shared by the calls, as by a step's layers
    # One chunk per (row, head), the default split, one block each; then blocks of other sizes
    # (the benchmark's launch sweep).
    for programs, config in [(1, None), (None, None), (10**4, None), (None, (16, 2, 2)), (10**4, (128, 8, 4))]:
        o, cache = torch.empty(b, kvh, g, hd), kv.clone()
        kernels.attention(*args, cache, bias, hd**-0.5, o, torch.tensor([last]), first, counts, programs=programs,
                          config=config)
        written = (cache[:, :, :, last] - expected_kv[:, :, :, last]).abs().max()
        block = (config or kernels.ATTENTION_CONFIG)[0]
        out["attention"].append([b, length, list(kernels.attention_split(b, kvh, length, programs, block)),
                                 float((o - reference).abs().max()), float(written), int(counts.abs().sum())])
    op_cache = expected_kv.clone()
    op = kernels.decode_attention(*args, op_cache, bias, hd**-0.5, torch.tensor([last]), first, counts)
    out["attention"].append([b, length, "op", float((op - reference).abs().max()),
                             float((op_cache - expected_kv).abs().max()), int(counts.abs().sum())])
out["advance"] = []
for b, eos in [(1, None), (1, [7, 3]), (5, [2]), (64, [0, 9, 4])]:
    nxt = torch.randint(0, 10, (b,))
    states = []
    for advance in (kernels.advance, kernels.library_advance):
        torch.manual_seed(b)  # the same starting state for both
        state = [torch.randint(0, 10, (b, 12)), torch.tensor([5]), torch.rand(b) < 0.3, None,
                 torch.randint(0, 10, (b,)), torch.randint(0, 100, (b,)), torch.tensor([130])]
        advance(nxt, *state[:3], torch.tensor(eos) if eos else None, *state[4:])
        states.append([t.tolist() for t in state if t is not None])
    hits = sum(int(t) in (eos or []) for t in nxt)
    out["advance"].append([b, eos, states[0] == states[1], hits])
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


def test_attention_at_every_batch_from_the_qkv_product_reads_only_what_it_must(checked):
    """The decode attention (per-head norms, rope, the cache write, attention) equals the library's
    at batch 1 to 64, with the cache in one chunk or split; it writes the new key and value where
    the library does, never reads past the position it writes, nor its own slot, nor a row's left
    padding (NaN there would show). A split cache's chunks are merged by the last to finish. The
    same at other block sizes."""
    splits = set()
    for batch, length, split, error, written_error, counts in checked["attention"]:
        assert error < 1e-5, (batch, length, split, error)
        assert written_error < 1e-5, (batch, length, split, written_error)
        assert counts == 0, (batch, length, split)  # the chunk counts are left zero for the next call
        splits.add("op" if split == "op" else split[0] > 1)
    assert splits == {True, False, "op"}  # the merged and single-chunk paths, and the registered op


def test_step_bookkeeping_in_one_kernel(checked):
    """After the argmax: the token stored at the step's column, rows on a stop id marked done, the
    position, write slot and step moved on, as the library's operations do it, with and without stop ids."""
    assert len(checked["advance"]) == 4
    for batch, eos, same, _ in checked["advance"]:
        assert same, (batch, eos)
    assert sum(hits for *_, hits in checked["advance"]) > 0  # some rows did stop


def test_single_row_products_with_their_norm_activation_and_residual_folded_in(checked):
    names = set()
    for name, n, k, same_shape, error in checked["products"]:
        assert same_shape and error < 1e-5, (name, n, k, error)
        names.add(name)
    assert names == {"linear", "norm", "residual", "swiglu"}
