"""Packed documents, ``forward(x, seq_idx=...)``: every layer equals its documents run separately (float64),
a passed state belongs to each row's first document, ``return_state`` is the state at the end of each row's
last document; through SSMBlock and SSMModel; bad ``seq_idx`` named."""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer, tol

import ssm
from ssm.layers import LAYERS
from ssm.layers.base import map_state, state_leaves

CASES = ([(name, {}) for name in LAYERS] + [("s4", {"disc": "zoh"})]
         + [(name, {"bidirectional": True}) for name in ("s4d", "s5", "mamba2")])
IDS = [name + "".join(f"-{k}" for k in kw) for name, kw in CASES]
SPANS = [[(0, 4), (4, 10), (10, 13)], [(0, 7), (7, 12), (12, 13)]]
SEQ = torch.tensor([[0] * 4 + [1] * 6 + [2] * 3, [3] * 7 + [5] * 5 + [6]])


def cat_states(states):
    leaves = [state_leaves(s) for s in states]
    it = iter([torch.cat([lv[i] for lv in leaves]) for i in range(len(leaves[0]))])
    return map_state(lambda _: next(it), states[0])


def assert_same(a, b) -> None:
    for s, t in zip(state_leaves(a), state_leaves(b), strict=True):
        torch.testing.assert_close(s, t, **tol(torch.float64))


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_packed_equals_separate_documents(name, kw):
    layer = make_layer(name, dtype=torch.float64, **kw)
    x = torch.randn(2, 13, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x, seq_idx=SEQ)
    ref = torch.cat([torch.cat([layer(x[b:b + 1, t0:t1]) for t0, t1 in spans], 1)
                     for b, spans in enumerate(SPANS)])
    torch.testing.assert_close(y, ref, **tol(torch.float64))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gr, **tol(torch.float64))
    if kw.get("bidirectional"):
        return
    # a state belongs to the first document; return_state is the last document's end; states at positions
    state = map_state(lambda t: torch.randn_like(t), layer.default_state(2))
    pos = torch.tensor([2, 5, 12])
    y, last, at = layer(x, state, seq_idx=SEQ, return_state=True, return_states_at=pos)
    rows = []
    for b, spans in enumerate(SPANS):
        row = map_state(lambda t, b=b: t[b:b + 1], state)
        rows.append(torch.cat([layer(x[b:b + 1, t0:t1], row if t0 == 0 else None) for t0, t1 in spans], 1))
    torch.testing.assert_close(y, torch.cat(rows), **tol(torch.float64))
    assert_same(last, cat_states([layer(x[b:b + 1, spans[-1][0]:], return_state=True)[1]
                                  for b, spans in enumerate(SPANS)]))
    for i, p in enumerate(pos.tolist()):
        want = []
        for b, spans in enumerate(SPANS):
            t0 = next(a for a, e in spans if a <= p < e)
            row = map_state(lambda t, b=b: t[b:b + 1], state) if t0 == 0 else None
            want.append(layer(x[b:b + 1, t0:p + 1], row, return_state=True)[1])
        assert_same(map_state(lambda t, i=i: t[i], at), cat_states(want))


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_packed_bad_seq_idx(name):
    layer = make_layer(name)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="seq_idx must be non-decreasing"):
        layer(x, seq_idx=torch.tensor([[0, 0, 1, 0, 1], [0] * 5]))
    for bad in (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5), torch.zeros(5, dtype=torch.long)):
        with pytest.raises(ValueError, match="seq_idx must be an integer tensor"):
            layer(x, seq_idx=bad)
    with pytest.raises(ValueError, match="seq_idx and lengths"):
        layer(x, seq_idx=torch.zeros(2, 5, dtype=torch.long), lengths=torch.tensor([5, 3]))


def test_packed_through_block_and_model():
    block = ssm.SSMBlock(4, layer="mamba", d_state=8, ff=2, dtype=torch.float64)
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    seq = torch.tensor([[0] * 5 + [1] * 4])
    torch.testing.assert_close(block(x, seq_idx=seq), torch.cat([block(x[:, :5]), block(x[:, 5:])], 1),
                               **tol(torch.float64))
    model = ssm.SSMModel(4, 3, d_model=4, n_layers=2, layer="s4d", d_state=8, pool="none",
                         dtype=torch.float64)
    torch.testing.assert_close(model(x, seq_idx=seq), torch.cat([model(x[:, :5]), model(x[:, 5:])], 1),
                               **tol(torch.float64))
