"""LM recipe: token-by-token generation (KV cache for softmax, recurrent state for linear attention) equals
recomputing the whole sequence, the KV-cache step equals a float64 softmax oracle, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.tasks.lm import _bin_timings, counting_text
from attnkit.tasks.lm_model import CharLM, SoftmaxSelfAttention
from reference import attention_ref, causal_ref


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_stepwise_generation_equals_full_recomputation(kind):
    torch.manual_seed(0)
    model = CharLM(23, embed_dim=16, num_heads=2, num_layers=2, attention=kind).double().eval()
    tokens = torch.randint(0, 23, (3, 40))
    with torch.no_grad():
        full = model(tokens)  # (B, L, V): every position recomputed from scratch
        state = model.init_state(3, 40)
        steps = []
        for pos in range(40):
            logits, state = model.step(tokens[:, pos], pos, state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-10, rtol=0)


def test_kv_cache_step_equals_float64_causal_softmax_oracle(gen):
    attn = SoftmaxSelfAttention(12, 3).double()
    x = torch.randn(2, 9, 12, generator=gen, dtype=torch.float64)
    B, L, E = x.shape
    m = attn.mha
    q, k, v = (proj(x).view(B, L, 3, 4).transpose(1, 2) for proj in (m.q_proj, m.k_proj, m.v_proj))  # (B, H, L, D)
    want, _ = attention_ref(q, k, v, mask=causal_ref(L, L))  # (B, H, L, D)
    want = m.out_proj(want.transpose(1, 2).reshape(B, L, E))
    cache = attn.new_cache(B, L, dtype=torch.float64)
    got = []
    for t in range(L):
        y, cache = attn.step(x[:, t], cache)
        got.append(y)
    torch.testing.assert_close(torch.stack(got, 1), want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="full"):
        attn.step(x[:, 0], cache)


def test_counting_text_and_bins():
    assert counting_text(3) == "one\ntwo\nthree\n"
    assert "twenty-one\n" in counting_text(21)
    r = _bin_timings([1e-3] * 10 + [2e-3] * 10, 2)
    assert r["ms_per_token_median"] == pytest.approx([1.0, 2.0]) and r["last_over_first"] == pytest.approx(2.0)
    # cost growing by 1 ms every 1,000 positions: slope 1, flat cost: slope 0
    ramp = _bin_timings([1e-3 + 1e-6 * t for t in range(4000)], 8)
    assert ramp["slope_ms_per_1000_positions"] == pytest.approx(1.0, rel=1e-6)
    assert _bin_timings([1e-3] * 4000, 8)["slope_ms_per_1000_positions"] == pytest.approx(0.0, abs=1e-9)


def test_tiny_run(tmp_path):
    from attnkit.cli import main

    assert main(["lm", "--quick", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["results"]) == {"linear", "softmax"}
    for r in metrics["results"].values():
        assert len(r["ms_per_token_median"]) == metrics["config"]["bins"] and r["ms_first_quarter"] > 0
    assert (tmp_path / "cost_per_token.png").stat().st_size > 0
