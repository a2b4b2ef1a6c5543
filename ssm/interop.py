"""State dicts of the official S4 code (github.com/state-spaces/s4) -> ``ssm`` layers with the same outputs.

``from_official_s4(state_dict, **layer_kwargs)`` reads the standalone layers of that repository:

* ``models/s4/s4d.py`` ``S4D``: ``D`` (H,), ``kernel.{log_dt (H,), log_A_real, A_imag (H, N/2),
  C (H, N/2, 2)}``, ``output_linear.0.{weight (2H, H, 1), bias}`` (a 1x1 Conv1d and a GLU); zoh, B = 1, GELU;
* ``models/s4/s4.py`` ``FFTConv`` (``D`` (C, H), ``kernel.*``) and ``S4Block`` (``layer.D``,
  ``layer.kernel.*``, ``output_linear.0.{weight, bias}`` when ``final_act`` is "glu" or "id") with the kernels
  ``SSMKernelDPLR`` (S4: ``inv_dt``, ``A_real``, ``A_imag``, ``B`` (1, S, N/2, 2), ``C`` (C', H, N/2, 2),
  ``P`` (R, S, N/2, 2), ``l_kernel``) and ``SSMKernelDiag`` (S4D: the same without P and l_kernel).

How the official parameters map to this project's (N/2 conjugate pairs stored on both sides):

* dt = transform(inv_dt) with ``dt_transform`` ("exp", the default of the standalone code: inv_dt = log dt;
  "softplus", "relu", "sigmoid", "none"), after sinh when ``dt_fast``. dt tied over the state (H, 1) is
  required: a per-mode dt (``dt_tie=False``) is accepted only when it is constant along N;
* Lambda = -transform(A_real) - i transform(A_imag) (``real_transform`` "exp", ``imag_transform`` "none" by
  default); the standalone S4D writes Lambda = -exp(log_A_real) + i A_imag. Stored here as
  log_neg_real = log(-Re Lambda) and Lambda_imag = Im Lambda;
* A, B, P have S = n_ssm copies, repeated H/S times over the features (feature h uses copy h mod S);
* the DPLR kernel trains C~ = C (I - Ab^L) at L = ``l_kernel`` (0: C itself); C is recovered exactly as
  C = C~ (I - Ab^L)^{-1} with the dense bilinear Ab = (I - dt/2 A)^{-1} (I + dt/2 A),
  A = diag(Lambda) - P P^*, in complex128 on the conjugate-doubled state. The official DPLR kernel is always
  bilinear; the diagonal kernel takes ``disc`` ("zoh" default, "bilinear") from ``layer_kwargs``;
* D (C, H) and the output projection copy over; bidirectional is read from C' = 2C. Without an output linear
  (a bare FFTConv, or ``final_act=None``) the projection is set to the identity (channels 1 only).

``layer_kwargs`` supply what a state dict does not record: ``activation`` (the FFTConv's, default "gelu";
the official names "id" / "linear" / "swish" are accepted), ``disc`` for the diagonal kernel, ``dropout``,
``ssm_lr``, ``device``, ``dtype``, ``backend``. Options the state dict cannot show and that this project does
not have are not detected: ``bandlimit``, ``swap_channels`` with C > 1, a ``final_act`` other than "glu"/"id",
``mult_act``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import S4, S4D, Mamba, Mamba2, SSMLayer
from .systems.dplr import bilinear_dense, expand_pairs

__all__ = ["from_hf_mamba", "from_official_s4"]

_TRANSFORMS = ("none", "exp", "relu", "sigmoid", "softplus")
_ACTIVATION_NAMES = {None: "identity", "id": "identity", "linear": "identity", "swish": "silu"}


def _transform(x: Tensor, name: str) -> Tensor:
    """The official ``param_transform``: a positive value from its stored parameter."""
    if name == "none":
        return x
    if name == "exp":
        return torch.exp(x)
    if name == "relu":
        return F.relu(x) + 1e-4
    if name == "sigmoid":
        return torch.sigmoid(x)
    return F.softplus(x)


def _complex(t: Tensor, key: str) -> Tensor:
    if t.shape[-1:] != (2,):
        raise ValueError(f"{key} must be a complex tensor stored as real (..., 2); got {tuple(t.shape)}")
    return torch.view_as_complex(t.to(torch.float64).contiguous())


def _tile(t: Tensor, H: int, key: str) -> Tensor:
    """(..., S, N) with S dividing H -> (..., H, N), feature h using copy h mod S (einops '(v t)')."""
    S = t.shape[-2]
    if H % S:
        raise ValueError(f"{key} has n_ssm={S} copies, which must divide d_model={H}")
    return t.repeat(*([1] * (t.ndim - 2)), H // S, 1)


def _untilde(Ct: Tensor, Lambda: Tensor, P: Tensor, dt: Tensor, L: int) -> Tensor:
    """C (C', H, N/2) from C~ = C (I - Ab^L): solve (I - Ab^L)^T C^T = C~^T on the doubled state."""
    Lf, Pf = expand_pairs(Lambda), expand_pairs(P)
    Ab = bilinear_dense(Lf, Pf, Pf, dt.to(torch.float64))  # (H, N, N) complex128
    M = torch.eye(Ab.shape[-1], dtype=Ab.dtype) - torch.linalg.matrix_power(Ab, L)
    Cf = expand_pairs(Ct)  # (C', H, N)
    C = torch.linalg.solve(M.mT[None], Cf[..., None])[..., 0]
    return C[..., : Ct.shape[-1]]


class _Keys:
    """The state dict under a prefix; every key must be read (what is left cannot be mapped)."""

    def __init__(self, sd: Mapping[str, Tensor], prefix: str) -> None:
        self.sd, self.prefix = sd, prefix
        self.left = {k for k in sd if k.startswith(prefix)}

    def has(self, key: str) -> bool:
        return self.prefix + key in self.sd

    def take(self, key: str, shape: tuple | None = None, *, integer: bool = False) -> Tensor:
        """The tensor under ``key``, checked: ``shape`` (ints, or None for any size), real floating point
        (or an integer scalar when ``integer``) and finite; a ValueError names the key otherwise."""
        full = self.prefix + key
        if full not in self.sd:
            raise ValueError(f"the state dict has no {full!r}, which the conversion needs")
        self.left.discard(full)
        v = self.sd[full]
        if not isinstance(v, Tensor):
            raise ValueError(f"{full!r} must be a tensor; got {type(v).__name__}")
        v = v.detach().cpu()
        if integer:
            if v.numel() != 1 or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
                raise ValueError(f"{full!r} must be an integer scalar; got {v.dtype} of shape "
                                 f"{tuple(v.shape)}")
            return v
        if not v.is_floating_point():
            raise ValueError(f"{full!r} must be a real floating-point tensor; got {v.dtype}")
        if shape is not None and (v.ndim != len(shape) or any(s is not None and s != n
                                                              for s, n in zip(shape, v.shape))):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{full!r} must have shape {want}; got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{full!r} holds non-finite values")
        return v

    def finish(self) -> None:
        if self.left:
            raise ValueError(f"cannot map {sorted(self.left)[0]!r} (and {len(self.left) - 1} more) of the "
                             "official state dict to an ssm layer")


def _set(layer_kwargs: dict, key: str, value, why: str) -> None:
    if key in layer_kwargs and layer_kwargs[key] != value:
        raise ValueError(f"{key}={layer_kwargs[key]!r} contradicts the state dict ({why}: {key}={value!r})")
    layer_kwargs[key] = value


def from_official_s4(
    state_dict: Mapping[str, Tensor],
    *,
    dt_transform: str = "exp",
    real_transform: str = "exp",
    imag_transform: str = "none",
    dt_fast: bool = False,
    **layer_kwargs,
) -> SSMLayer:
    """An ``ssm.S4`` (DPLR kernel) or ``ssm.S4D`` (diagonal kernels) with the outputs of an official layer.

    Args:
        state_dict: the ``state_dict()`` of one official ``S4D`` (s4d.py), ``FFTConv`` or ``S4Block`` (s4.py),
            possibly under a prefix (the keys of one layer inside a model).
        dt_transform, real_transform, imag_transform, dt_fast: the official kernel options of the same names
            (not recorded in a state dict).
        layer_kwargs: keyword arguments of the ``ssm`` layer that the state dict does not record (see the
            module docstring); d_model, d_state, rank, channels, bidirectional and glu come from the shapes.

    Returns:
        The layer in eval mode, in ``dtype`` (default float32); its parameters are computed in float64.

    Raises:
        ValueError: a key that cannot be mapped (named), a per-mode dt that varies along N, an unknown
            transform, or a layer_kwarg that contradicts the state dict (``disc="zoh"`` for the DPLR kernel).
    """
    for name, value in (("dt_transform", dt_transform), ("real_transform", real_transform),
                        ("imag_transform", imag_transform)):
        if value not in _TRANSFORMS:
            raise ValueError(f"{name} must be one of {_TRANSFORMS}; got {value!r}")
    cands = [k[: -len("kernel.C")] for k in state_dict if k.endswith("kernel.C")]
    if len(cands) != 1:
        raise ValueError(f"expected the state dict of one official S4 layer (one '...kernel.C' key); found "
                         f"{len(cands)}: pass the keys of a single layer")
    prefix = cands[0]
    kw = dict(layer_kwargs)
    if "activation" in kw:
        kw["activation"] = _ACTIVATION_NAMES.get(kw["activation"], kw["activation"])
    if prefix + "kernel.log_A_real" in state_dict:  # models/s4/s4d.py: the minimal S4D
        return _from_minimal_s4d(state_dict, prefix, kw)

    # ---- models/s4/s4.py: an FFTConv, or an S4Block around one (its keys under "layer.") ----
    block = prefix.endswith("layer.")
    keys = _Keys(state_dict, prefix[: -len("layer.")] if block else prefix)
    inner = "layer." if block else ""
    kernel = inner + "kernel."
    dplr = keys.has(kernel + "P")
    if keys.has(kernel + "l_kernel") and not dplr:
        raise ValueError(f"the state dict has {keys.prefix + kernel + 'l_kernel'!r} (a DPLR kernel) but no "
                         f"{keys.prefix + kernel + 'P'!r}, which the conversion needs")
    inv_dt = keys.take(kernel + "inv_dt", (None, None)).to(torch.float64)
    if dt_fast:
        inv_dt = torch.sinh(inv_dt)
    dt = _transform(inv_dt, dt_transform)  # (H, 1) or (H, N/2)
    H = dt.shape[0]
    if dt.ndim != 2 or (dt.shape[1] > 1 and not torch.allclose(dt, dt[:, :1], rtol=1e-12, atol=0)):
        raise ValueError(f"cannot map {keys.prefix + kernel + 'inv_dt'!r} of shape {tuple(dt.shape)}: this "
                         "project has one dt per feature (dt_tie=True); a dt that varies along the state has "
                         "no counterpart")
    dt = dt[:, 0]
    is_real = not keys.has(kernel + "A_imag")
    A_real = keys.take(kernel + "A_real", (None, None)).to(torch.float64)
    S, N2 = A_real.shape
    re = -_transform(A_real, real_transform)
    im = (torch.zeros_like(re) if is_real
          else -_transform(keys.take(kernel + "A_imag", (S, N2)).to(torch.float64), imag_transform))
    Lambda = _tile(torch.complex(re, im), H, kernel + "A_real")  # (H, N/2)
    if is_real:  # real modes: C, B real (..., N); each becomes a pair with Im = 0 (2 Re(.) as officially)
        B = keys.take(kernel + "B", (1, S, N2)).to(torch.float64)[0]
        B = _tile(B, H, kernel + "B").to(torch.complex128)
        C = keys.take(kernel + "C", (None, H, N2)).to(torch.complex128)
    else:
        B = _complex(keys.take(kernel + "B", (1, S, N2, 2)), kernel + "B")[0]
        B = _tile(B, H, kernel + "B")  # (H, N/2)
        C = _complex(keys.take(kernel + "C", (None, H, N2, 2)), kernel + "C")  # (C', H, N/2)
    if dplr:
        P = _complex(keys.take(kernel + "P", (None, S, N2, 2)), kernel + "P")
        P = _tile(P, H, kernel + "P")  # (R, H, N/2)
        # C~ = C (I - Ab^L) is what the kernel trains: without l_kernel, C cannot be recovered.
        L = int(keys.take(kernel + "l_kernel", integer=True).item())
        if L < 0:
            raise ValueError(f"{keys.prefix + kernel + 'l_kernel'!r} must be >= 0; got {L}")
        if L > 0:
            C = _untilde(C, Lambda, P, dt, L)
        _set(kw, "disc", "bilinear", "the official DPLR kernel is bilinear")
    D = keys.take(inner + "D", (None, H)).to(torch.float64)
    channels = D.shape[0]
    if C.shape[0] not in (channels, 2 * channels):
        raise ValueError(f"cannot map {keys.prefix + kernel + 'C'!r}: {C.shape[0]} kernel channels for D "
                         f"with {channels}")
    _set(kw, "bidirectional", C.shape[0] == 2 * channels, "C has twice the channels of D")
    _set(kw, "channels", channels, "D has that many channels")
    weight = bias = None
    if block and keys.has("output_linear.0.weight"):
        weight = keys.take("output_linear.0.weight").to(torch.float64)
        if weight.ndim == 3 and weight.shape[-1] == 1:  # a 1x1 Conv1d
            weight = weight[..., 0]
        if weight.shape[0] not in (H, 2 * H) or weight.shape[1] != channels * H:
            raise ValueError(f"cannot map {keys.prefix + 'output_linear.0.weight'!r} of shape "
                             f"{tuple(weight.shape)}: expected ({H} or {2 * H}, {channels * H})")
        bias = keys.take("output_linear.0.bias", (weight.shape[0],)).to(torch.float64)
        _set(kw, "glu", weight.shape[0] == 2 * H, "the output linear maps to 2H (final_act='glu')")
    else:
        if channels != 1:
            raise ValueError(f"without an output linear the layer returns {channels} x {H} features; the ssm "
                             "layers project to d_model, so only channels=1 maps")
        _set(kw, "glu", False, "there is no output linear")
    keys.finish()

    if dplr:
        layer = S4(H, 2 * N2, rank=P.shape[0], **kw)
        values = {"P": P}
    else:
        layer = S4D(H, 2 * N2, **kw)
        values = {}
    values.update(log_neg_real=torch.log(-Lambda.real), Lambda_imag=Lambda.imag, B=B, C=C,
                  log_dt=torch.log(dt), D=D)
    return _load(layer, values, weight, bias)


def _from_minimal_s4d(state_dict, prefix: str, kw: dict) -> SSMLayer:
    k = _Keys(state_dict, prefix)
    log_A_real = k.take("kernel.log_A_real", (None, None)).to(torch.float64)
    H, N2 = log_A_real.shape
    log_dt = k.take("kernel.log_dt", (H,)).to(torch.float64)
    A_imag = k.take("kernel.A_imag", (H, N2)).to(torch.float64)
    C = _complex(k.take("kernel.C", (H, N2, 2)), prefix + "kernel.C")[None]  # (1, H, N/2)
    D = k.take("D", (H,)).to(torch.float64)[None]  # (1, H)
    weight = k.take("output_linear.0.weight", (2 * H, H, 1)).to(torch.float64)[..., 0]  # (2H, H)
    bias = k.take("output_linear.0.bias", (2 * H,)).to(torch.float64)
    k.finish()
    _set(kw, "disc", "zoh", "the minimal S4D is zoh")
    _set(kw, "glu", True, "the minimal S4D ends in a GLU")
    _set(kw, "channels", 1, "the minimal S4D has one channel")
    _set(kw, "bidirectional", False, "the minimal S4D is causal")
    layer = S4D(H, 2 * N2, **kw)
    values = {"log_neg_real": log_A_real, "Lambda_imag": A_imag,
              "B": torch.ones(H, N2, dtype=torch.complex128), "C": C, "log_dt": log_dt, "D": D}
    return _load(layer, values, weight, bias)


def _load(layer: SSMLayer, values: dict, weight: Tensor | None, bias: Tensor | None) -> SSMLayer:
    """Write the float64 values into the layer's state dict (complex as real views) and load it."""
    sd = layer.state_dict()
    H = layer.d_model
    for name, v in values.items():
        if v.is_complex():
            v = torch.view_as_real(v.resolve_conj().contiguous())
        if tuple(sd[name].shape) != tuple(v.shape):
            raise ValueError(f"{name}: shape {tuple(v.shape)} does not fit the layer's "
                             f"{tuple(sd[name].shape)}")
        sd[name] = v.to(sd[name].dtype)
    if weight is None:
        weight = torch.eye(H, layer.channels * H, dtype=torch.float64)
        bias = torch.zeros(H, dtype=torch.float64)
    sd["out_proj.weight"] = weight.to(sd["out_proj.weight"].dtype)
    sd["out_proj.bias"] = bias.to(sd["out_proj.bias"].dtype)
    layer.load_state_dict(sd)
    if not all(bool(torch.isfinite(p.detach()).all()) for p in layer.parameters()):
        raise ValueError("the converted parameters are not finite (is l_kernel right? I - Ab^L is singular)")
    return layer.eval()


# ---------------------------------------------------------------------------------------------------------
# Hugging Face's Mamba and Mamba-2 mixers -> ssm.Mamba / ssm.Mamba2 (same parameter names: a state-dict copy)


def _mixers(module: torch.nn.Module, kinds: tuple[type, ...]) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, kinds)]


def _hf_mamba_layer(mixer, mamba_cls, mamba2_cls):
    """One transformers ``MambaMixer`` / ``Mamba2Mixer`` -> the ssm layer with its configuration, weights."""
    act = getattr(mixer, "activation", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"from_hf_mamba: the mixer's hidden_act must be 'silu' (Mamba's); got {act!r}")
    p = next(mixer.parameters())
    factory = {"device": p.device, "dtype": p.dtype}
    if isinstance(mixer, mamba_cls):
        layer = Mamba(mixer.hidden_size, mixer.ssm_state_size, d_conv=mixer.conv_kernel_size,
                      expand=mixer.intermediate_size // mixer.hidden_size, dt_rank=mixer.time_step_rank,
                      conv_bias=mixer.use_conv_bias, bias=mixer.use_bias, **factory)
        if layer.d_inner != mixer.intermediate_size:
            raise ValueError(f"from_hf_mamba: intermediate_size must be a multiple of hidden_size; got "
                             f"{mixer.intermediate_size} and {mixer.hidden_size}")
    else:
        heads = mixer.num_heads
        if heads * mixer.head_dim != mixer.intermediate_size:
            raise ValueError(f"from_hf_mamba: num_heads * head_dim must equal expand * hidden_size; got "
                             f"{heads} * {mixer.head_dim} and {mixer.intermediate_size}")
        limit = tuple(float(v) for v in mixer.time_step_limit)
        layer = Mamba2(mixer.hidden_size, mixer.ssm_state_size, d_conv=mixer.conv_kernel_size,
                       expand=mixer.intermediate_size // mixer.hidden_size, headdim=mixer.head_dim,
                       ngroups=mixer.n_groups, chunk_size=mixer.chunk_size, dt_limit=limit,
                       conv_bias=mixer.use_conv_bias, bias=mixer.use_bias, norm_eps=mixer.layer_norm_epsilon,
                       **factory)
    missing, unexpected = layer.load_state_dict(mixer.state_dict(), strict=False)
    missing = [k for k in missing if k != "_extra_state"]
    if missing or unexpected:
        raise ValueError(f"from_hf_mamba: the mixer's parameters do not match {type(layer).__name__}'s: "
                         f"missing {missing}, unexpected {unexpected}")
    return layer.train(mixer.training)


def from_hf_mamba(module: torch.nn.Module):
    """A transformers ``MambaMixer`` or ``Mamba2Mixer`` -> ``ssm.Mamba`` / ``ssm.Mamba2`` with the same
    weights and outputs; a whole ``MambaModel``, ``Mamba2Model`` or ``*ForCausalLM`` -> a list with one layer
    per mixer, in order.

    The parameter names are mamba_ssm's on all three sides (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``
    or ``dt_bias``, ``A_log``, ``D``, ``norm``, ``out_proj``), so this is a state-dict copy with the
    configuration read off the mixer. A state dict of mamba_ssm's own ``Mamba`` / ``Mamba2`` loads with
    ``layer.load_state_dict`` directly.

    Raises:
        ValueError: ``module`` holds no Mamba mixer, or a mixer with an activation other than SiLU or
            inconsistent sizes.
    """
    try:
        from transformers.models.mamba.modeling_mamba import MambaMixer
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    except ImportError as err:  # pragma: no cover - transformers is a test dependency
        raise ImportError("from_hf_mamba needs transformers: pip install transformers") from err
    if isinstance(module, (MambaMixer, Mamba2Mixer)):
        return _hf_mamba_layer(module, MambaMixer, Mamba2Mixer)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"module must be a transformers MambaMixer, Mamba2Mixer or a model holding them; "
                         f"got {type(module).__name__}")
    mixers = _mixers(module, (MambaMixer, Mamba2Mixer))
    if not mixers:
        raise ValueError(f"module must be a transformers MambaMixer, Mamba2Mixer or a model holding them; "
                         f"{type(module).__name__} holds none")
    return [_hf_mamba_layer(m, MambaMixer, Mamba2Mixer) for m in mixers]
