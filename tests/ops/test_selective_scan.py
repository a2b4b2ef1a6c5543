"""ssm.ops.selective_scan: selective_scan_fn == selective_scan_ref == an explicit loop (float64), gradients,
float32 accuracy, stability for large delta |A|, memory, bad arguments and transformers' Mamba scan."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, tol

from ssm.ops.selective_scan import selective_scan_fn, selective_scan_ref

f64 = torch.float64


def operands(b=2, d=6, n=3, L=11, bc=("shared", "shared"), g=3, dtype=f64):
    """Random operands of a stable scan; bc picks the form of B and C: shared, token or grouped."""
    forms = {"shared": (d, n), "token": (b, n, L), "grouped": (b, g, n, L)}
    return {
        "u": torch.randn(b, d, L, dtype=dtype),
        "delta": torch.rand(b, d, L, dtype=dtype) * 0.5 + 0.05,
        "A": -torch.rand(d, n, dtype=dtype) - 0.1,
        "B": torch.randn(*forms[bc[0]], dtype=dtype),
        "C": torch.randn(*forms[bc[1]], dtype=dtype),
        "D": torch.randn(d, dtype=dtype),
        "z": torch.randn(b, d, L, dtype=dtype),
        "delta_bias": torch.randn(d, dtype=dtype) * 0.3,
        "initial_state": torch.randn(b, d, n, dtype=dtype),
    }


def explicit_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  initial_state=None):
    """Scalar-by-scalar recurrence h = exp(delta a) h + delta b u, y = sum_n c h + D u, out = y silu(z)."""
    b, d, L = u.shape
    n = A.shape[1]
    out = torch.zeros(b, d, L, dtype=f64)
    last = torch.zeros(b, d, n, dtype=f64)

    def coef(M, i, j, t):  # B or C of batch i, channel j at time t: (N,)
        if M.ndim == 2:
            return M[j]
        if M.ndim == 3:
            return M[i, :, t]
        return M[i, j // (d // M.shape[1]), :, t]

    for i in range(b):
        for j in range(d):
            h = torch.zeros(n, dtype=f64) if initial_state is None else initial_state[i, j].clone()
            for t in range(L):
                dt = delta[i, j, t] + (0 if delta_bias is None else delta_bias[j])
                dt = F.softplus(dt) if delta_softplus else dt
                h = torch.exp(dt * A[j]) * h + dt * coef(B, i, j, t) * u[i, j, t]
                y = (coef(C, i, j, t) * h).sum() + (0 if D is None else D[j] * u[i, j, t])
                out[i, j, t] = y * (1 if z is None else F.silu(z[i, j, t]))
            last[i, j] = h
    return out, last


@pytest.mark.parametrize("L", [1, 2, 5, 16, 17, 33, 64, 127, 300])
def test_fn_equals_ref_equals_loop_over_lengths(L):
    ops = operands(b=1, d=2, n=3, L=L, bc=("token", "grouped"), g=2)
    kw = {k: ops[k] for k in ("D", "z", "delta_bias", "initial_state")}
    out, last = selective_scan_fn(ops["u"], ops["delta"], ops["A"], ops["B"], ops["C"], **kw,
                                  delta_softplus=True, return_last_state=True, chunk_size=16)
    ref, ref_last = selective_scan_ref(ops["u"], ops["delta"], ops["A"], ops["B"], ops["C"], **kw,
                                       delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref, **tol(f64))
    torch.testing.assert_close(last, ref_last, **tol(f64))
    if L <= 64:
        loop, loop_last = explicit_loop(ops["u"], ops["delta"], ops["A"], ops["B"], ops["C"], **kw,
                                        delta_softplus=True)
        torch.testing.assert_close(ref, loop, **tol(f64))
        torch.testing.assert_close(ref_last, loop_last, **tol(f64))


OPTIONAL = ("D", "z", "delta_bias", "initial_state")


@pytest.mark.parametrize("bc", list(itertools.product(["shared", "token", "grouped"], repeat=2)))
@pytest.mark.parametrize("extras", [(), OPTIONAL, ("D", "delta_bias"), ("z", "initial_state")])
def test_fn_equals_loop_for_every_form(bc, extras):
    ops = operands(L=13, bc=bc)
    kw = {k: ops[k] for k in extras}
    softplus = "delta_bias" in extras
    out, last = selective_scan_fn(ops["u"], ops["delta"], ops["A"], ops["B"], ops["C"], **kw,
                                  delta_softplus=softplus, return_last_state=True, chunk_size=4)
    loop, loop_last = explicit_loop(ops["u"], ops["delta"], ops["A"], ops["B"], ops["C"], **kw,
                                    delta_softplus=softplus)
    torch.testing.assert_close(out, loop, **tol(f64))
    torch.testing.assert_close(last, loop_last, **tol(f64))
    assert torch.equal(selective_scan_fn(ops["u"], ops["delta"], ops["A"], ops["B"], ops["C"], **kw,
                                         delta_softplus=softplus, chunk_size=4), out)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunk_size_does_not_change_the_result(chunk):
    ops = operands(L=29, bc=("grouped", "token"))
    kw = {k: ops[k] for k in OPTIONAL}
    base = selective_scan_ref(ops["u"], ops["delta"], ops["A"], ops["B"], ops["C"], **kw)
    out = selective_scan_fn(ops["u"], ops["delta"], ops["A"], ops["B"], ops["C"], **kw, chunk_size=chunk)
    torch.testing.assert_close(out, base, **tol(f64))


def test_state_passing_equals_one_pass():
    ops = operands(L=40, bc=("token", "token"))
    args = [ops[k] for k in ("u", "delta", "A")]
    full, last = selective_scan_fn(*args, ops["B"], ops["C"], return_last_state=True)
    y1, h1 = selective_scan_fn(*(a[..., :15] if a.ndim == 3 else a for a in args), ops["B"][..., :15],
                               ops["C"][..., :15], return_last_state=True)
    y2, h2 = selective_scan_fn(*(a[..., 15:] if a.ndim == 3 else a for a in args), ops["B"][..., 15:],
                               ops["C"][..., 15:], return_last_state=True, initial_state=h1)
    torch.testing.assert_close(torch.cat([y1, y2], -1), full, **tol(f64))
    torch.testing.assert_close(h2, last, **tol(f64))


@pytest.mark.parametrize("bc", [("shared", "grouped"), ("token", "shared"), ("grouped", "token")])
def test_gradcheck(bc):
    ops = operands(b=1, d=4, n=2, L=7, bc=bc, g=2)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    inputs = [ops[k].clone().requires_grad_() for k in names]

    def f(u, delta, A, B, C, D, z, delta_bias, h0):
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state=h0,
                                      chunk_size=3)
        return out, last

    assert torch.autograd.gradcheck(f, inputs)


def test_gradients_match_the_reference():
    ops = operands(L=21, bc=("grouped", "grouped"))
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    grads = []
    for fn in (selective_scan_fn, selective_scan_ref):
        inputs = {k: ops[k].clone().requires_grad_() for k in names}
        h0 = inputs.pop("initial_state")
        out, last = fn(**inputs, delta_softplus=True, return_last_state=True, initial_state=h0)
        (out.sin().sum() + last.cos().sum()).backward()
        grads.append([inputs[k].grad for k in inputs] + [h0.grad])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, **tol(f64))


def test_float32_within_the_table():
    ops = operands(b=2, d=8, n=4, L=100, bc=("token", "token"))
    kw = {k: ops[k] for k in OPTIONAL}
    ref = selective_scan_ref(ops["u"], ops["delta"], ops["A"], ops["B"], ops["C"], **kw, delta_softplus=True)
    f32 = {k: v.float() for k, v in ops.items()}
    kw32 = {k: f32[k] for k in OPTIONAL}
    out, last = selective_scan_fn(f32["u"], f32["delta"], f32["A"], f32["B"], f32["C"], **kw32,
                                  delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_err(out, ref) < tol(torch.float32)["rtol"]


def test_half_input_computes_in_float32():
    ops = operands(L=9, dtype=torch.float32)
    out, last = selective_scan_fn(ops["u"].bfloat16(), ops["delta"].bfloat16(), ops["A"], ops["B"], ops["C"],
                                  return_last_state=True)
    ref = selective_scan_ref(ops["u"].bfloat16().float(), ops["delta"].bfloat16().float(), ops["A"],
                             ops["B"], ops["C"])
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, **tol(torch.bfloat16))


def test_stable_for_huge_delta_times_a():
    ops = operands(b=1, d=4, n=3, L=50, bc=("token", "token"), dtype=torch.float32)
    delta = torch.full_like(ops["delta"], 100.0)
    A = torch.full_like(ops["A"], -100.0)
    inputs = [t.clone().requires_grad_() for t in (ops["u"], delta, A, ops["B"], ops["C"])]
    out, last = selective_scan_fn(*inputs, return_last_state=True, chunk_size=8)
    (out.sum() + last.sum()).backward()
    assert all(torch.isfinite(t).all() for t in (out, last, *(i.grad for i in inputs)))
    # exp(-1e4) is 0: each state is the last input alone, h_t = delta B_t u_t
    h = 100.0 * ops["B"][..., -1].unsqueeze(1) * ops["u"][..., -1:]
    torch.testing.assert_close(last, h, **tol(torch.float32))


def test_forward_saves_no_state_per_step():
    b, d, n, L = 2, 32, 16, 256
    ops = operands(b=b, d=d, n=n, L=L, bc=("token", "token"), dtype=torch.float32)
    inputs = [ops[k].requires_grad_() for k in ("u", "delta", "A", "B", "C")]
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan_fn(*inputs, delta_softplus=True, chunk_size=16)
    # O(B D L) for the inputs and delta, plus one (B, D, N) state per chunk of 16 steps: never (B, D, N, L)
    budget = 8 * b * d * L * 4 + (L // 16 + 1) * b * d * n * 4
    assert max(saved) <= b * d * L * 4 and sum(saved) < min(budget, b * d * n * L * 4), (saved, budget)
    out.sum().backward()


def call(**changes):
    ops = operands(L=5, bc=("token", "token"))
    ops.update(changes)
    return selective_scan_fn(**ops)


@pytest.mark.parametrize("changes, name", [
    ({"u": torch.randn(2, 6)}, "u"),
    ({"delta": torch.randn(2, 6, 4)}, "delta"),
    ({"A": torch.randn(6, 3, dtype=torch.complex128)}, "A"),
    ({"A": torch.randn(5, 3)}, "A"),
    ({"B": torch.randn(2, 3)}, "B"),
    ({"B": torch.randn(2, 4, 3, 5)}, "B"),
    ({"C": torch.randn(2, 3, 4)}, "C"),
    ({"C": torch.randn(2, 3, 5, 2)}, "C"),
    ({"D": torch.randn(5)}, "D"),
    ({"z": torch.randn(2, 6, 4)}, "z"),
    ({"delta_bias": torch.randn(6, 1)}, "delta_bias"),
    ({"initial_state": torch.randn(2, 6, 4)}, "initial_state"),
    ({"delta_softplus": "yes"}, "delta_softplus"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_arguments_are_named(changes, name):
    with pytest.raises(ValueError, match=name):
        call(**changes)


def test_transformers_mamba_scan_agrees():
    pytest.importorskip("transformers")
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = MambaConfig(hidden_size=16, state_size=4, intermediate_size=32, time_step_rank=4, conv_kernel=3,
                         use_mambapy=False)
    mixer = MambaMixer(config, layer_idx=0).eval()
    x = torch.randn(2, 19, 16)
    captured = {}

    def hook(module, args, out):
        captured["x"] = args[0]

    handle = mixer.x_proj.register_forward_hook(hook)
    with torch.no_grad():
        expected = mixer(x)
    handle.remove()
    # the same layer with the scan replaced by selective_scan_fn
    with torch.no_grad():
        xz = mixer.in_proj(x).transpose(1, 2)
        hs, gate = xz.chunk(2, dim=1)
        hs = mixer.act(mixer.conv1d(hs)[..., : x.shape[1]])
        torch.testing.assert_close(hs.transpose(1, 2), captured["x"])
        dt, B, C = torch.split(mixer.x_proj(hs.transpose(1, 2)), [4, 4, 4], dim=-1)
        delta = mixer.dt_proj.weight @ dt.transpose(1, 2)
        A = -torch.exp(mixer.A_log.float())
        y = selective_scan_fn(hs, delta, A, B.transpose(1, 2), C.transpose(1, 2), mixer.D.float(), gate,
                              mixer.dt_proj.bias.float(), delta_softplus=True)
        out = mixer.out_proj(y.transpose(1, 2))
    assert rel_err(out, expected) < 1e-5
