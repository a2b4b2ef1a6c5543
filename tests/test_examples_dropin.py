"""examples/transformer_dropin.py and examples/streaming_inference.py on tiny sizes, and the code of
docs/*.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import streaming_inference as streaming
import torch
import transformer_dropin as dropin
from conftest import tol

import ssm

ROOT = Path(__file__).resolve().parents[1]
#: Packages of the test extra that a doc page may import (the page is skipped without them).
OPTIONAL = ("onnx", "onnxscript", "onnxruntime")
DOC_PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.md") if "```python" in p.read_text())


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is faster, above all on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _doc_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)


def _run_doc(page: str) -> dict:
    namespace: dict = {"__name__": f"docs_{page}"}
    for block in _doc_blocks(page):
        exec(compile(block, str(ROOT / "docs" / page), "exec"), namespace)
    return namespace


TINY_DROPIN = ["--steps", "3", "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-state", "8",
               "--vocab", "5", "--delay", "4", "--seq-len", "12", "--batch-size", "4", "--log-every", "1",
               "--gen-len", "9", "--bench-d-model", "16", "--contexts", "8", "40", "--bench-steps", "2"]


# ---- transformer_dropin.py ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mixer", dropin.MIXERS)
def test_dropin_smoke(mixer, capsys):
    result = dropin.main(TINY_DROPIN + ["--mixer", mixer])
    out = capsys.readouterr().out
    assert "copy accuracy" in out and "per-token decoding latency" in out
    assert result["mixer"] == mixer and len(result["history"]) == 3
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in result["history"])
    assert 0.0 <= result["generation_accuracy"] <= 1.0
    assert result["step_vs_forward_max_abs_diff"] < 1e-3  # main() also asserted it against the logits' scale
    assert result["encoder"]["padding_leak"] < 1e-5 and result["encoder"]["first_position_change"] > 1e-6
    rows = result["latency"]
    assert [r["context"] for r in rows] == [8, 40]
    ssm_bytes = [r[mixer]["state_bytes"] for r in rows]
    kv_bytes = [r["attention"]["state_bytes"] for r in rows]
    assert kv_bytes[1] > 3 * kv_bytes[0]  # the KV cache grows with the context (13 -> 45 tokens)
    if mixer != "attention":
        assert ssm_bytes[0] == ssm_bytes[1]  # the SSM state does not
    assert all(0 < r[mixer]["min_ms"] <= r[mixer]["ms"] for r in rows)


def test_dropin_ssm_learns_the_delay():
    """A small S4D decoder learns a period-6 copy far above chance (1/4) within a few seconds."""
    result = dropin.main(["--mixer", "s4d", "--steps", "120", "--d-model", "32", "--n-layers", "1",
                          "--d-state", "16", "--vocab", "4", "--delay", "6", "--seq-len", "30",
                          "--batch-size", "16", "--lr", "1e-2", "--log-every", "40", "--gen-len", "12",
                          "--bench-d-model", "16", "--contexts", "8", "--bench-steps", "1"])
    assert result["eval_accuracy"] > 0.9
    assert result["generation_accuracy"] > 0.6  # greedy: an early error is copied D steps later


def test_kv_cache_matches_full_attention():
    """Prefill in two pieces, then steps: the same outputs as one causal attention over the sequence."""
    attn = dropin.SelfAttention(8, 2, causal=True, max_len=20).eval()
    x = torch.randn(3, 11, 8)
    with torch.no_grad():
        full = attn(x)
        y1, cache = attn(x[:, :4], return_state=True)
        y2, cache = attn(x[:, 4:7], cache, return_state=True)
        ys = [attn.step(x[:, t], cache)[0] for t in range(7, 11)]
    torch.testing.assert_close(torch.cat([y1, y2, torch.stack(ys, 1)], 1), full, rtol=1e-5, atol=1e-6)
    assert cache.length == 11 and cache.nbytes() == 2 * 3 * 8 * 11 * 4


def test_dropin_bad_arguments():
    with pytest.raises(ValueError, match="mixer"):
        dropin.make_mixer("lstm", 8, causal=True)
    with pytest.raises(ValueError, match="d_model"):
        dropin.SelfAttention(10, 4, causal=True, max_len=8)
    attn = dropin.SelfAttention(8, 2, causal=True, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        attn(torch.randn(1, 5, 8), return_state=True)
    with pytest.raises(ValueError, match="causal"):
        dropin.SelfAttention(8, 2, causal=False, max_len=8)(torch.randn(1, 3, 8), return_state=True)
    with pytest.raises(SystemExit):
        dropin.parse_args(["--seq-len", "4", "--delay", "8"])
    with pytest.raises(SystemExit):
        dropin.parse_args(["--mixer", "lstm"])


# ---- streaming_inference.py --------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", sorted(ssm.layers.LAYERS))
def test_streaming_smoke(layer, capsys):
    result = streaming.main(["--layer", layer, "--length", "3000", "--chunk", "700", "--step-prefix", "120",
                             "--d-model", "8", "--d-state", "16"])
    out = capsys.readouterr().out
    assert "samples/s" in out and "max |chunked - one pass|" in out
    scale = result["output_scale"]
    assert scale > 0
    assert result["chunk_max_abs_diff"] <= tol(torch.float32)["rtol"] * scale
    assert result["step_max_abs_diff"] <= tol(torch.float32)["rtol"] * scale
    for key in ("one_pass_samples_per_s", "one_pass_cached_samples_per_s", "chunked_samples_per_s",
                "step_samples_per_s"):
        assert result[key] > 0


def test_streaming_float64_differences_are_rounding():
    result = streaming.main(["--layer", "s4d", "--double", "--length", "2000", "--chunk", "333",
                             "--step-prefix", "50", "--d-model", "4", "--d-state", "8", "--n-layers", "1"])
    assert result["chunk_max_abs_diff"] <= tol(torch.float64)["rtol"] * result["output_scale"]
    assert result["step_max_abs_diff"] <= tol(torch.float64)["rtol"] * result["output_scale"]


def test_streaming_bad_arguments():
    with pytest.raises(SystemExit):
        streaming.parse_args(["--chunk", "0"])
    with pytest.raises(SystemExit):
        streaming.parse_args(["--length", "10", "--step-prefix", "11"])


# ---- docs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", [p for p in DOC_PAGES if p != "convert_to_rtf.md"])
def test_doc_code_runs(page):
    assert _doc_blocks(page)
    for module in OPTIONAL:  # a page that imports an optional package runs where it is installed
        if any(re.search(rf"^(import|from) {module}\b", block, re.M) for block in _doc_blocks(page)):
            pytest.importorskip(module)
    _run_doc(page)  # every block asserts its own claims


def test_convert_to_rtf_page():
    """The page's S4D and S4 conversions run and give the documented agreement; its helper validates input."""
    ns = _run_doc("convert_to_rtf.md")
    s4d, rtf = ns["s4d"], ns["rtf"]
    assert isinstance(rtf, ssm.RTF) and rtf.d_state == s4d.d_state and rtf.channels == s4d.channels
    assert ns["kernel_error"](s4d, rtf, 1000) < 1e-6
    assert ns["kernel_error"](ns["s4"], ns["rtf_s4"], 1000) < 1e-6
    with pytest.raises(ValueError, match="layer"):
        ns["to_rtf"](ssm.S4D(4, 8, bidirectional=True))
    rtf8 = ssm.RTF(4, 8)
    copy8 = ns["to_rtf"](rtf8)  # an RTF layer converts to a (float64) copy of itself
    assert copy8 is not rtf8 and torch.equal(copy8.b.float(), rtf8.b)
