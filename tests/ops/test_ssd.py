"""ssm.ops.ssd: mamba_chunk_scan_combined == mamba_chunk_scan_ref == selective_scan_fn with A shared per
head (float64), documents (seq_idx), the direct and the factored decay matrix, groups of chunks, gradients
(gradcheck of the autograd.Function), float32, stability, memory, bad arguments, transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tol
from torch.utils._python_dispatch import TorchDispatchMode

from ssm.ops import ssd
from ssm.ops.selective_scan import selective_scan_fn
from ssm.ops.ssd import mamba_chunk_scan_combined, mamba_chunk_scan_ref

f64 = torch.float64


def operands(b=2, l=23, h=4, p=3, g=2, n=5, dtype=f64):
    return {
        "x": torch.randn(b, l, h, p, dtype=dtype),
        "dt": torch.randn(b, l, h, dtype=dtype),
        "A": -torch.rand(h, dtype=dtype) - 0.1,
        "B": torch.randn(b, l, g, n, dtype=dtype),
        "C": torch.randn(b, l, g, n, dtype=dtype),
        "D": torch.randn(h, p, dtype=dtype),
        "z": torch.randn(b, l, h, p, dtype=dtype),
        "dt_bias": torch.randn(h, dtype=dtype) * 0.3,
        "initial_states": torch.randn(b, h, p, n, dtype=dtype),
    }


def as_selective_scan(ops, **kw):
    """The same scan through selective_scan_fn: heads expanded to channels d = h p + i, A shared per head."""
    x, dt, A, B, C = (ops[k] for k in ("x", "dt", "A", "B", "C"))
    b, l, h, p = x.shape
    n = B.shape[-1]
    u = x.reshape(b, l, h * p).transpose(1, 2)
    delta = dt.repeat_interleave(p, dim=2).transpose(1, 2)
    A_ch = A.repeat_interleave(p)[:, None].expand(h * p, n)
    D = kw.get("D")
    D = None if D is None else (D if D.ndim == 2 else D[:, None].expand(h, p)).reshape(h * p)
    z = kw.get("z")
    z = None if z is None else z.reshape(b, l, h * p).transpose(1, 2)
    bias = kw.get("dt_bias")
    bias = None if bias is None else bias.repeat_interleave(p)
    h0 = kw.get("initial_states")
    h0 = None if h0 is None else h0.reshape(b, h * p, n)
    out, last = selective_scan_fn(u, delta, A_ch, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D, z, bias,
                                  kw.get("dt_softplus", False), True, initial_state=h0)
    return out.transpose(1, 2).reshape(b, l, h, p), last.reshape(b, h, p, n)


@pytest.mark.parametrize("l", [1, 2, 7, 16, 17, 50, 131, 300])
def test_chunked_equals_ref_equals_selective_scan(l):
    ops = operands(l=l)
    kw = {k: ops[k] for k in ("D", "z", "dt_bias", "initial_states")}
    args = [ops[k] for k in ("x", "dt", "A", "B", "C")]
    out, last = mamba_chunk_scan_combined(*args, 16, **kw, dt_softplus=True, return_final_states=True)
    ref, ref_last = mamba_chunk_scan_ref(*args, 16, **kw, dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(out, ref, **tol(f64))
    torch.testing.assert_close(last, ref_last, **tol(f64))
    sel, sel_last = as_selective_scan(ops, **kw, dt_softplus=True)
    torch.testing.assert_close(ref, sel, **tol(f64))
    torch.testing.assert_close(ref_last, sel_last, **tol(f64))


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
@pytest.mark.parametrize("extras", [{}, {"D1": True}, {"z": True, "dt_limit": (0.2, 0.9)}])
def test_options_and_chunk_sizes(chunk, extras):
    ops = operands(l=29, g=1)
    kw = {}
    if extras.get("D1"):
        kw["D"] = ops["D"][:, 0]
    if extras.get("z"):
        kw["z"] = ops["z"]
    if "dt_limit" in extras:
        kw["dt_limit"] = extras["dt_limit"]
    args = [ops[k] for k in ("x", "dt", "A", "B", "C")]
    out, last = mamba_chunk_scan_combined(*args, chunk, **kw, return_final_states=True)
    ref, ref_last = mamba_chunk_scan_ref(*args, chunk, **kw, return_final_states=True)
    torch.testing.assert_close(out, ref, **tol(f64))
    torch.testing.assert_close(last, ref_last, **tol(f64))
    if "dt_limit" not in extras:  # the default clamp (0, inf) zeroes negative dt; selective_scan_fn does not
        ops["dt"] = ops["dt"].abs()
        out = mamba_chunk_scan_combined(*(ops[k] for k in ("x", "dt", "A", "B", "C")), chunk, **kw)
        torch.testing.assert_close(out, as_selective_scan(ops, **kw)[0], **tol(f64))


def test_documents_reset_the_state():
    ops = operands(b=2, l=30)
    seq_idx = torch.tensor([[0] * 7 + [1] * 12 + [2] * 11, [2] * 20 + [5] * 10])
    args = [ops[k] for k in ("x", "dt", "A", "B", "C")]
    kw = {"initial_states": ops["initial_states"], "dt_softplus": True, "return_final_states": True}
    out, last = mamba_chunk_scan_combined(*args, 8, seq_idx=seq_idx, **kw)
    ref, ref_last = mamba_chunk_scan_ref(*args, 8, seq_idx=seq_idx, **kw)
    torch.testing.assert_close(out, ref, **tol(f64))
    torch.testing.assert_close(last, ref_last, **tol(f64))
    # row 0: each document is its own scan (the first from the initial state); row 1 never sees it
    for start, stop, h0 in ((0, 7, ops["initial_states"][:1]), (7, 19, None), (19, 30, None)):
        piece = [a[:1, start:stop] for a in args[:2]] + [ops["A"]] + [a[:1, start:stop] for a in args[3:]]
        alone, alone_last = mamba_chunk_scan_ref(*piece, 8, initial_states=h0, dt_softplus=True,
                                                 return_final_states=True)
        torch.testing.assert_close(out[:1, start:stop], alone, **tol(f64))
    torch.testing.assert_close(last[:1], alone_last, **tol(f64))
    piece = [a[1:, 20:] for a in args[:2]] + [ops["A"]] + [a[1:, 20:] for a in args[3:]]
    torch.testing.assert_close(out[1:, 20:], mamba_chunk_scan_ref(*piece, 8, dt_softplus=True), **tol(f64))


def test_gradcheck():
    ops = operands(b=1, l=7, h=2, p=2, g=1, n=2)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
    inputs = [ops[k].clone().requires_grad_() for k in names]
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])

    def f(x, dt, A, B, C, D, z, dt_bias, h0):
        return mamba_chunk_scan_combined(x, dt, A, B, C, 4, D, z, dt_bias, h0, seq_idx, True,
                                         return_final_states=True)

    # the dt preprocessing is plain autograd around the Function (checked in full below): a quick check
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("documents", [True, False], ids=["seq_idx", "one-document"])
@pytest.mark.parametrize("path", ["factored", "direct"])
def test_function_gradcheck(monkeypatch, path, documents):
    """The custom autograd.Function in float64, every differentiable input (x, dt, A, B, C, D, z, the initial
    state), two groups of two heads, one chunk a group, two full chunks and a short last one; the factored
    decay matrix with sub-blocks of 2 (every dt A <= 0), the direct one with a positive A; documents that
    start inside a chunk and at a chunk start."""
    monkeypatch.setattr(ssd, "SUB", 2)
    monkeypatch.setattr(ssd, "GROUP_ELEMENTS", 1)
    b, l, h, p, g, n, Q = 1, 9, 4, 2, 2, 2, 4
    ops = operands(b=b, l=l, h=h, p=p, g=g, n=n)
    A = ops["A"] if path == "factored" else ops["A"] + torch.tensor([0.0, 0.8, 0.0, 0.8], dtype=f64)
    inputs = [ops["x"], torch.rand(b, l, h, dtype=f64), A, ops["B"], ops["C"], ops["D"], ops["z"],
              ops["initial_states"]]
    inputs = [t.clone().requires_grad_() for t in inputs]
    seq_idx = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 2, 2]]) if documents else None

    def f(*args):
        return ssd._SSD.apply(*args, seq_idx, Q, path == "factored")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of evaluations of tiny ops: threads only add overhead
    try:
        assert torch.autograd.gradcheck(f, inputs)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("groups", ["one-chunk", "all-chunks"])
@pytest.mark.parametrize("chunk", [64, 96])
def test_factored_decay_and_chunk_groups_equal_ref(monkeypatch, chunk, groups):
    """Chunks of 64 and 96 steps take the factored decay matrix (sub-blocks of 32), the short last chunk the
    direct one; one chunk at a time or all at once; every option, documents included."""
    if groups == "one-chunk":
        monkeypatch.setattr(ssd, "GROUP_ELEMENTS", 1)
    ops = operands(l=300)
    seq_idx = torch.tensor([[0] * 70 + [1] * 150 + [3] * 80, [0] * 300])
    args = [ops[k] for k in ("x", "dt", "A", "B", "C")]
    kw = {k: ops[k] for k in ("D", "z", "dt_bias", "initial_states")}
    kw.update(dt_softplus=True, dt_limit=(0.01, 2.0), return_final_states=True, seq_idx=seq_idx)
    out, last = mamba_chunk_scan_combined(*args, chunk, **kw)
    ref, ref_last = mamba_chunk_scan_ref(*args, chunk, **kw)
    torch.testing.assert_close(out, ref, **tol(f64))
    torch.testing.assert_close(last, ref_last, **tol(f64))
    args[2] = -args[2]  # growth instead of decay: the direct decay matrix everywhere
    out = mamba_chunk_scan_combined(*args, chunk, **kw)[0]
    torch.testing.assert_close(out, mamba_chunk_scan_ref(*args, chunk, **kw)[0], **tol(f64))


def test_float32_within_the_table():
    ops = operands(l=100, h=4, p=8, n=8)
    kw = {k: ops[k] for k in ("D", "z", "dt_bias", "initial_states")}
    ref = mamba_chunk_scan_ref(*(ops[k] for k in ("x", "dt", "A", "B", "C")), 32, **kw, dt_softplus=True)
    f32 = {k: v.float() for k, v in ops.items()}
    out = mamba_chunk_scan_combined(*(f32[k] for k in ("x", "dt", "A", "B", "C")), 32,
                                    **{k: f32[k] for k in kw}, dt_softplus=True)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < tol(torch.float32)["rtol"]


def test_stable_for_huge_dt_times_a():
    ops = operands(b=1, l=40, dtype=torch.float32)
    dt = torch.full_like(ops["dt"], 100.0).requires_grad_()
    A = torch.full_like(ops["A"], -100.0).requires_grad_()
    x, B, C = (ops[k].clone().requires_grad_() for k in ("x", "B", "C"))
    out, last = mamba_chunk_scan_combined(x, dt, A, B, C, 16, return_final_states=True)
    (out.sum() + last.sum()).backward()
    assert all(torch.isfinite(t).all() for t in (out, last, x.grad, dt.grad, A.grad, B.grad, C.grad))
    # each state is the last input alone: h = dt x B^T
    expect = 100.0 * x[0, -1, :, :, None] * B[0, -1].repeat_interleave(2, 0)[:, None, :]
    torch.testing.assert_close(last[0], expect, **tol(torch.float32))


def test_no_tensor_of_size_blhpn():
    b, l, h, p, g, n = 1, 128, 4, 16, 1, 32
    ops = operands(b=b, l=l, h=h, p=p, g=g, n=n, dtype=torch.float32)
    inputs = [ops[k].requires_grad_() for k in ("x", "dt", "A", "B", "C")]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        mamba_chunk_scan_combined(*inputs, 32, dt_softplus=True).sum().backward()
    assert max(saved) < b * l * h * p * n / 8


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op creates."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_one_chunk_of_q_by_q_at_a_time(monkeypatch):
    """Forward and backward never create a (b, h, l, Q) tensor: no op output exceeds the larger of x and one
    chunk's (b, h, Q, Q) block; the Function saves its inputs and the (b, l / Q, h, p, n) chunk states."""
    b, l, h, p, g, n, Q = 1, 128, 2, 4, 1, 4, 16
    monkeypatch.setattr(ssd, "GROUP_ELEMENTS", b * h * Q * Q)
    ops = operands(b=b, l=l, h=h, p=p, g=g, n=n, dtype=torch.float32)
    inputs = [ops[k].requires_grad_() for k in ("x", "dt", "A", "B", "C")]
    saved = []
    with _LargestOutput() as mode:  # also sees the backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = mamba_chunk_scan_combined(*inputs, Q, D=ops["D"], dt_softplus=True)
        out.sum().backward()
    assert mode.largest <= max(b * l * h * p, b * h * Q * Q) < b * h * l * Q
    inputs_size = sum(t.numel() for t in inputs) + ops["D"].numel()
    # the inputs, the chunk states and the (b, l, h) tensors of the dt preprocessing (plain autograd)
    assert sum(saved) <= inputs_size + b * (l // Q) * h * p * n + 3 * b * l * h


def call(**changes):
    ops = operands(l=6)
    ops["chunk_size"] = 4
    ops.update(changes)
    return mamba_chunk_scan_combined(**ops)


@pytest.mark.parametrize("changes, name", [
    ({"x": torch.randn(2, 6, 4)}, "x"),
    ({"dt": torch.randn(2, 6, 3)}, "dt"),
    ({"A": torch.randn(4, 1)}, "A"),
    ({"B": torch.randn(2, 6, 3, 5)}, "B"),
    ({"C": torch.randn(2, 6, 2, 4)}, "C"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"D": torch.randn(4, 2)}, "D"),
    ({"z": torch.randn(2, 6, 4, 2)}, "z"),
    ({"dt_bias": torch.randn(3)}, "dt_bias"),
    ({"initial_states": torch.randn(2, 4, 3, 4)}, "initial_states"),
    ({"seq_idx": torch.tensor([[0, 0, 1, 1, 0, 0]] * 2)}, "seq_idx"),
    ({"seq_idx": torch.zeros(2, 6)}, "seq_idx"),
    ({"dt_limit": (1.0, 0.5)}, "dt_limit"),
    ({"dt_softplus": 1}, "dt_softplus"),
])
def test_bad_arguments_are_named(changes, name):
    with pytest.raises(ValueError, match=name):
        call(**changes)


def test_transformers_mamba2_torch_scan_agrees():
    pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    ops = operands(b=2, l=37, h=4, p=8, g=2, n=8, dtype=torch.float32)
    args = [ops[k] for k in ("x", "dt", "A", "B", "C")]
    kw = {"D": ops["D"][:, 0], "dt_bias": ops["dt_bias"], "initial_states": ops["initial_states"],
          "dt_softplus": True, "dt_limit": (0.0, 4.0), "return_final_states": True}
    with torch.no_grad():
        expected, expected_last = mamba2_chunk_scan(*args, 8, **kw)
        out, last = mamba_chunk_scan_combined(*args, 8, **kw)
    assert rel_err(out, expected) < 1e-5 and rel_err(last, expected_last) < 1e-5
