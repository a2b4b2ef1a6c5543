"""ONNX export (docs/deployment.md): ``torch.onnx.export(..., dynamo=True)`` of every layer's forward with a
dynamic length and of its step (``ssm.export.StepModule``), run in ONNX Runtime, equal to PyTorch in float32
to 1e-5 of the output's scale. One export holds every layer (an export costs seconds, mostly fixed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssm
from ssm.export import StepModule, real_arithmetic

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

H = 8
CASES = {
    "s4-bilinear": lambda bi: ssm.S4(H, 8, bidirectional=bi),
    "s4-zoh": lambda bi: ssm.S4(H, 8, disc="zoh", bidirectional=bi),
    "s4d": lambda bi: ssm.S4D(H, 8, bidirectional=bi),
    "rtf": lambda bi: ssm.RTF(H, 8, bidirectional=bi),
    "s5": lambda bi: ssm.S5(H, 8, bidirectional=bi),
    "mamba": lambda bi: ssm.Mamba(H, 4, bidirectional=bi),
    "mamba2": lambda bi: ssm.Mamba2(H, 4, headdim=4, chunk_size=8, bidirectional=bi),
}


class _Every(nn.Module):
    """Every layer on the same input: one graph for all (the outputs in order)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


class _EverySteps(nn.Module):
    """Every layer's StepModule on the same token: (y_1, ..., y_n, *state_1, ..., *state_n)."""

    def __init__(self, steps, sizes):
        super().__init__()
        self.steps, self.sizes = nn.ModuleList(steps), sizes

    def forward(self, x, *states):
        ys, out, i = [], [], 0
        for step, n in zip(self.steps, self.sizes):
            y, *nxt = step(x, *states[i:i + n])
            ys.append(y)
            out += nxt
            i += n
        return (*ys, *out)


def _session(program):
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _assert_scaled(got, ref):
    got = torch.as_tensor(got)
    assert got.shape == ref.shape
    assert (got.double() - ref.double()).abs().max() <= 1e-5 * ref.double().abs().max()


def _check_forward(program, model):
    session = _session(program)
    for L in (37, 300):  # neither the example's length: one graph serves every length
        x = torch.randn(2, L, H)
        outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            refs = model(x)
        refs = refs if isinstance(refs, tuple) else (refs,)
        assert len(outs) == len(refs)
        for got, ref in zip(outs, refs):
            _assert_scaled(got, ref)


def test_onnx_forward_every_layer_dynamic_length():
    """Every layer but Mamba (the next test) and a bidirectional one, in one graph, inside
    ``real_arithmetic`` (the LTI layers' step constants are computed there, before the trace)."""
    torch.manual_seed(0)
    layers = [make(False).eval() for name, make in CASES.items() if name != "mamba"]
    layers.append(CASES["s4d"](True).eval())
    model = _Every(layers)
    with real_arithmetic(model):
        program = torch.onnx.export(model, (torch.randn(2, 48, H),), dynamo=True, verbose=False,
                                    dynamic_shapes={"x": {1: torch.export.Dim("L", min=2, max=1 << 16)}})
    _check_forward(program, model)


def test_onnx_export_takes_the_real_route_by_itself():
    """A plain ``torch.onnx.export`` of Mamba (no constants to compute first): the route is chosen while
    exporting, and the length stays dynamic."""
    torch.manual_seed(2)
    layer = CASES["mamba"](False).eval()
    program = torch.onnx.export(layer, (torch.randn(2, 48, H),), dynamo=True, verbose=False,
                                dynamic_shapes={"x": {1: torch.export.Dim("L", min=2, max=1 << 16)}})
    _check_forward(program, layer)


def test_onnx_step_every_layer():
    torch.manual_seed(1)
    layers = [make(False).eval() for make in CASES.values()]
    steps = [StepModule(layer) for layer in layers]
    sizes = [len(s.initial_state(1)) for s in steps]
    model = _EverySteps(steps, sizes)
    x = torch.randn(3, 5, H)
    states = [t for s in steps for t in s.initial_state(3)]
    with real_arithmetic(model):
        program = torch.onnx.export(model.eval(), (x[:, 0], *states), dynamo=True, verbose=False)
    session = _session(program)
    names = [i.name for i in session.get_inputs()]
    refs = [layer.default_state(3) for layer in layers]
    feed = [t.numpy() for t in states]
    for t in range(x.shape[1]):
        outs = session.run(None, dict(zip(names, [x[:, t].numpy(), *feed])))
        assert len(outs) == len(layers) + len(states)
        feed = outs[len(layers):]
        with torch.no_grad():
            stepped = [layer.step(x[:, t], st) for layer, st in zip(layers, refs)]
        refs = [st for _, st in stepped]
        for got, (y, _) in zip(outs, stepped):
            _assert_scaled(got, y)
    i = 0
    for step, n, ref in zip(steps, sizes, refs):  # the states, back in the layers' own form
        back = step.from_real(tuple(torch.as_tensor(t) for t in feed[i:i + n]))
        for got, want in zip(ssm.layers.base.state_leaves(back), ssm.layers.base.state_leaves(ref)):
            _assert_scaled(torch.view_as_real(got) if got.is_complex() else got,
                           torch.view_as_real(want) if want.is_complex() else want)
        i += n


def test_onnx_lti_layer_outside_real_arithmetic_is_named():
    """An LTI layer exported without its step constants: the exporter's error names the remedy."""
    with pytest.raises(Exception, match=r"ssm\.export\.real_arithmetic"):
        torch.onnx.export(ssm.S4D(4, 8).eval(), (torch.randn(1, 16, 4),), dynamo=True, verbose=False)
