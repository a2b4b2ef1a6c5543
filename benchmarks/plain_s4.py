"""A plain S4 as most ports write it, and ssm.S4 measured against it.

    python benchmarks/plain_s4.py            # B=4, H=128, N=64, L = 1024 4096 8192 (a few minutes)
    python benchmarks/plain_s4.py --quick    # tiny sizes, seconds

``PlainS4`` is the yardstick a user would otherwise run: the S4 kernel the way the annotated S4 and the
official "minimal" S4 compute it, in one self-contained module (it imports nothing from ``ssm``):

* the dense bilinear discretization dA = (I - dt/2 A)^{-1} (I + dt/2 A) of A = diag(Lambda) - P P^* with
  the conjugate pairs appended (N real states), and C~ = C (I - dA^L) by a dense matrix power;
* the generating function at the L//2 + 1 non-negative DFT frequencies z = exp(-2 pi i k / L),

      K^(z) = 2 / (1 + z) C~ (g(z) - A)^{-1} B,   g(z) = 2 / dt (1 - z) / (1 + z),

  with the rank-1 Woodbury identity, every term a materialized Cauchy sum: the (4, H, N, L//2 + 1) complex
  matrix v / (g - Lambda) is formed and summed over N (autograd keeps it for the backward);
* an inverse real FFT for K, then the causal convolution by FFTs of length 2L, the D skip, GELU and the
  output projection.

It has the parameterization, the initialization (HiPPO-LegS NPLR, rank 1) and the output of ``ssm.S4`` with
``disc="bilinear"``: ``PlainS4.from_layer(layer)`` copies a layer's parameters and matches its output to
float32 accuracy (tests/test_benchmarks_smoke.py). Like ``ssm.S4`` it trains the true C and recomputes C~
in every call; the official code trains C~ for a fixed length instead, which saves the dense power
(O(H N^3 log L), a small part of the time at N = 64).

Running the file times forward (training mode, no grad: the kernel is computed each call) and
forward+backward of both layers, and measures their peak memory (see benchmarks/bench_common.py), writing
benchmarks/results/plain_s4.json and plain_s4.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402


# ---- the plain S4 ------------------------------------------------------------------------------------------
def legs_nplr_half(N: int) -> tuple[Tensor, Tensor, Tensor]:
    """HiPPO-LegS in NPLR form, one eigenvalue of each conjugate pair: Lambda (N/2,), P (N/2,), B (N/2,).

    A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k); B_n = sqrt(2n+1); P_n = sqrt(n + 1/2), so that
    A + P P^T = -I/2 + S with S skew-symmetric, S = V diag(i lambda) V^*; in the eigenbasis
    A = diag(Lambda) - (V^* P)(V^* P)^* with Lambda = -1/2 + i lambda. Computed in float64.
    """
    n = torch.arange(N, dtype=torch.float64)
    q = torch.sqrt(2 * n + 1)
    A = -(torch.tril(q[:, None] * q[None, :]) - torch.diag(n))
    P = torch.sqrt(n + 0.5)
    S = A + P[:, None] * P[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)  # skew-symmetric
    lam, V = torch.linalg.eigh(-1j * S.to(torch.complex128))  # S = V diag(i lam) V^*
    keep = torch.argsort(lam)[N // 2:]  # Im(Lambda) > 0, ascending
    V = V[:, keep]
    Lambda = torch.complex(torch.full((N // 2,), -0.5, dtype=torch.float64), lam[keep])
    Pt = V.conj().T @ P.to(V.dtype)
    Bt = V.conj().T @ q.to(V.dtype)
    return Lambda, Pt, Bt


class PlainS4(nn.Module):
    """S4 layer (DPLR, bilinear, rank 1) written plainly: see the module docstring.

    Args:
        d_model: H.
        d_state: N (even); N/2 complex modes are stored, the conjugates appended in the kernel.
        channels: C output channels per feature, mixed by the output projection.
        dt_min, dt_max: range of the log-uniform initialization of dt.

    Shapes: forward x (B, L, H) -> (B, L, H); kernel(L) -> (C, H, L).
    """

    def __init__(self, d_model: int, d_state: int = 64, *, channels: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1) -> None:
        super().__init__()
        if d_state % 2:
            raise ValueError(f"d_state must be even; got {d_state}")
        H, N2 = d_model, d_state // 2
        self.d_model, self.d_state, self.channels = d_model, d_state, channels
        Lambda, P, B = legs_nplr_half(d_state)
        self.log_neg_real = nn.Parameter(torch.log(-Lambda.real).float().expand(H, N2).clone())
        self.Lambda_imag = nn.Parameter(Lambda.imag.float().expand(H, N2).clone())
        self.P = nn.Parameter(torch.view_as_real(P.to(torch.complex64)).expand(1, H, N2, 2).clone())
        self.B = nn.Parameter(torch.view_as_real(B.to(torch.complex64)).expand(H, N2, 2).clone())
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, H, N2, dtype=torch.complex64)).clone())
        self.D = nn.Parameter(torch.randn(channels, H))
        self.out_proj = nn.Linear(channels * H, H)

    @classmethod
    def from_layer(cls, layer) -> PlainS4:
        """A PlainS4 holding a copy of the parameters of an ``ssm.S4`` layer (float32, bilinear, rank 1)."""
        problems = []
        if getattr(layer, "disc", None) != "bilinear":
            problems.append(f"disc='bilinear' (got {getattr(layer, 'disc', None)!r})")
        if getattr(layer, "rank", None) != 1:
            problems.append(f"rank=1 (got {getattr(layer, 'rank', None)!r})")
        if layer.bidirectional or layer.transposed or layer.glu or layer.activation != "gelu":
            problems.append("bidirectional=False, transposed=False, glu=False, activation='gelu'")
        if layer.log_dt.dtype != torch.float32:
            problems.append(f"float32 parameters (got {layer.log_dt.dtype})")
        if problems:
            raise ValueError("layer must be an ssm.S4 with " + "; ".join(problems))
        plain = cls(layer.d_model, layer.d_state, channels=layer.channels).to(layer.log_dt.device)
        with torch.no_grad():
            for name in ("log_neg_real", "Lambda_imag", "P", "B", "log_dt", "C", "D"):
                getattr(plain, name).copy_(getattr(layer, name))
            plain.out_proj.load_state_dict(layer.out_proj.state_dict())
        return plain

    def kernel(self, L: int) -> Tensor:
        """The convolution kernel (C, H, L)."""
        Lambda = torch.complex(-torch.exp(self.log_neg_real), self.Lambda_imag)  # (H, N/2)
        P = torch.view_as_complex(self.P)  # (1, H, N/2)
        B = torch.view_as_complex(self.B)  # (H, N/2)
        C = torch.view_as_complex(self.C)  # (C, H, N/2)
        dt = torch.exp(self.log_dt)  # (H,)

        def full(t: Tensor) -> Tensor:  # append the conjugate pairs: (..., N/2) -> (..., N)
            return torch.cat([t, t.conj()], dim=-1)

        Lambda, P, B, C = full(Lambda), full(P), full(B), full(C)
        N = Lambda.shape[-1]
        eye = torch.eye(N, dtype=Lambda.dtype, device=Lambda.device)
        A = torch.diag_embed(Lambda) - P[0, :, :, None] * P[0, :, None, :].conj()  # (H, N, N)
        half = (dt / 2)[:, None, None].to(A.dtype)
        dA = torch.linalg.solve(eye - half * A, eye + half * A)  # bilinear, (H, N, N)
        dA_L = torch.linalg.matrix_power(dA, L)
        Ct = C - torch.einsum("chn,hnm->chm", C, dA_L)  # C~ = C (I - dA^L)

        k = torch.arange(L // 2 + 1, dtype=torch.float64, device=Lambda.device)
        omega = torch.exp(-2j * math.pi * k / L)  # (M,)
        z = 2 * (1 - omega) / (1 + omega)  # huge but finite at omega = -1, as in the official code
        g = (z[None, :] / dt[:, None].double()).to(Lambda.dtype)  # (H, M): 2/dt (1 - omega) / (1 + omega)
        left = torch.cat([Ct, P.conj()], dim=0)  # (C+1, H, N)
        right = torch.cat([B[None], P], dim=0)  # (2, H, N)
        v = left[:, None] * right[None]  # (C+1, 2, H, N)
        cauchy = v[..., None] / (g[:, None, :] - Lambda[..., None])  # (C+1, 2, H, N, M), materialized
        r = cauchy.sum(-2)  # (C+1, 2, H, M)
        c = self.channels
        k_f = r[:c, 0] - r[:c, 1] * r[c:, 0] / (1 + r[c:, 1])  # rank-1 Woodbury, (C, H, M)
        k_f = k_f * (2 / (1 + omega)).to(k_f.dtype)
        return torch.fft.irfft(k_f, n=L)  # (C, H, L)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, H) -> (B, L, H)."""
        L = x.shape[1]
        u = x.transpose(1, 2)  # (B, H, L)
        K = self.kernel(L)  # (C, H, L)
        u_f = torch.fft.rfft(u, n=2 * L)[:, None]  # (B, 1, H, L+1)
        y = torch.fft.irfft(u_f * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]  # (B, C, H, L)
        y = y + self.D[..., None] * u[:, None]  # (B, C, H, L)
        y = F.gelu(y.permute(0, 3, 1, 2).reshape(x.shape[0], L, -1))  # (B, L, C*H)
        return self.out_proj(y)


# ---- the benchmark ---------------------------------------------------------------------------------------
MODELS = ("ssm.S4", "PlainS4")
MODES = ("fwd", "fwd+bwd")


def build_case(model: str, mode: str, B: int, H: int, N: int, L: int, device: str = "cpu",
               seed: int = 0):
    """A zero-argument callable running ``mode`` of ``model`` on a (B, L, H) input (training mode)."""
    import ssm

    torch.manual_seed(seed)
    layer = ssm.S4(H, N).to(device)
    if model == "PlainS4":
        layer = PlainS4.from_layer(layer)
    layer.train()
    x = torch.randn(B, L, H, device=device)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return layer(x)
        return run
    return common.backward_fn(lambda: layer(x), list(layer.parameters()))


def plain_bytes_estimate(B: int, H: int, N: int, L: int) -> float:
    """Rough peak bytes of PlainS4 forward+backward: the Cauchy matrix and its autograd copies."""
    return 4 * (4 * H * N * (L // 2 + 1) * 8) + 16 * B * H * L * 8


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="ssm.S4 against a plain S4 (materialized Cauchy)")
    common.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--H", type=int, default=128)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--L", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--mem-limit-gib", type=float, default=8.0,
                        help="skip PlainS4 cases whose estimated peak exceeds this")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.H, args.N, args.L, args.repeats = 1, 8, 8, [64, 256], 2
    common.setup(args)
    info = common.machine_info(args.device)
    print(f"ssm.S4 vs PlainS4: B={args.batch} H={args.H} N={args.N}  torch {info['torch']}, "
          f"{info['threads']} threads, {info['cpu']}")

    cases, rows = [], []
    for L in args.L:
        for mode in MODES:
            for model in MODELS:
                case = dict(model=model, mode=mode, B=args.batch, H=args.H, N=args.N, L=L, device=args.device)
                est = plain_bytes_estimate(args.batch, args.H, args.N, L)
                row = dict(case)
                if model == "PlainS4" and est > args.mem_limit_gib * common.GiB:
                    row["skipped"] = f"needs ~{est / common.GiB:.1f} GiB"
                else:
                    fn = build_case(**case)
                    row.update(common.timeit(fn, device=args.device, repeats=args.repeats))
                    cases.append((len(rows), case))
                    del fn
                rows.append(row)
                print(f"  {model:8s} {mode:8s} L={L:<6d} "
                      f"{common.fmt_time(row.get('median_s')) if 'median_s' in row else row['skipped']}",
                      flush=True)
    if not args.no_memory:
        mem = common.measure_memory(__file__, "build_case", [c for _, c in cases], device=args.device)
        for (i, _), m in zip(cases, mem):
            rows[i].update(m)

    def get(model, mode, L, key):
        for r in rows:
            if (r["model"], r["mode"], r["L"]) == (model, mode, L):
                return r.get(key)
        return None

    table_rows = []
    for L in args.L:
        for mode in MODES:
            t_s, t_p = get("ssm.S4", mode, L, "median_s"), get("PlainS4", mode, L, "median_s")
            m_s, m_p = get("ssm.S4", mode, L, "peak_bytes"), get("PlainS4", mode, L, "peak_bytes")
            table_rows.append([L, mode, common.fmt_time(t_s), common.fmt_time(t_p),
                               common.fmt_ratio(common.ratio(t_s, t_p)), common.fmt_bytes(m_s),
                               common.fmt_bytes(m_p), common.fmt_ratio(common.ratio(m_s, m_p))])
    table = common.format_table(["L", "mode", "ssm.S4", "PlainS4", "time ratio", "ssm.S4 mem", "PlainS4 mem",
                                 "mem ratio"], table_rows)
    print()
    print(table)
    payload = {"benchmark": "plain_s4", "machine": info,
               "config": {"B": args.batch, "H": args.H, "N": args.N, "L": args.L, "repeats": args.repeats,
                          "quick": args.quick},
               "rows": rows, "table": table}
    path = common.write_json(args.out / "plain_s4.json", payload)

    def draw(axes):
        labels = ("time (s, median)", "peak memory (bytes)")
        for ax, key, label in zip(axes, ("median_s", "peak_bytes"), labels):
            for i, model in enumerate(MODELS):
                for mode, style in zip(MODES, ("--", "-")):
                    pts = [(L, get(model, mode, L, key)) for L in args.L]
                    pts = [(a, b) for a, b in pts if b]
                    if pts:
                        ax.plot(*zip(*pts), style, color=f"C{i}", marker="o", label=f"{model} {mode}")
            common.style_axes(ax, xlabel="L", ylabel=label)
        axes[0].set_title(f"S4 layer, B={args.batch} H={args.H} N={args.N}")

    common.save_plot(args.out / "plain_s4.png", draw, ncols=2)
    print(f"\nwrote {path} and {args.out / 'plain_s4.png'}")
    return payload


if __name__ == "__main__":
    main()
