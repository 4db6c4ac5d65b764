"""The roofline lower bound of a profiled step, against counts worked out by hand for tiny-llama."""
from __future__ import annotations

import pandas as pd
import pytest

from specbatch.profiler import roofline as R
from specbatch.profiler.presets import make_config

# tiny-llama: hidden 64, 2 layers, 4 heads of 16, 2 K/V heads, ffn 128 (gate, up, down), vocab 512
LINEAR = 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128)  # q,o + k,v + mlp per layer = 36,864; x 2 layers
KV_PER_TOKEN_FP32 = 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head dim x 4 bytes = 512


def shape():
    return R.Shape.from_config(make_config("tiny-llama"))


def test_counts_by_hand():
    s = shape()
    assert LINEAR == 73_728 and s.linear_params == LINEAR and s.kv_bytes_per_token(4) == KV_PER_TOKEN_FP32
    # decode: batch 1, 1 token after 16 cached, logits of 1 token, fp32
    flops = 2 * LINEAR + 4 * 2 * 4 * 16 * (16 + 1) + 2 * 64 * 512  # linear + attention (c + (t+1)/2) + LM head
    nbytes = (LINEAR + 512 * 64) * 4 + 17 * 512 + 1 * 512 + 512 * 4  # weights + KV read + KV written + logits
    assert (flops, nbytes) == (221_696, 437_248) == R.step_cost(s, 1, 1, 16, 1, 4)
    # memory-bound at 1 GB/s and 1 GFLOP/s: 437.248 µs
    assert R.bound_s(s, "decode", 1, 1, 16, peak_flops=1e9, bandwidth=1e9, dtype_bytes=4) == pytest.approx(437.248e-6)
    # verify γ=4 at batch 8, context 100: 5 tokens, all 5 logits kept
    f = 2 * 40 * LINEAR + 4 * 40 * 2 * 4 * 16 * (100 + 3) + 2 * 8 * 5 * 64 * 512
    b = (LINEAR + 512 * 64) * 4 + 8 * 105 * 512 + 40 * 512 + 8 * 5 * 512 * 4
    assert (f, b) == R.step_cost(s, 8, 5, 100, 5, 4)
    assert R.bound_s(s, "verify", 8, 5, 100, peak_flops=1e9, bandwidth=1e12, dtype_bytes=4) == pytest.approx(f / 1e9)


def test_gpu_names():
    assert R.gpu_spec_for("NVIDIA H100 80GB HBM3") == "h100-sxm" and R.gpu_spec_for("NVIDIA H200") == "h200"
    assert R.gpu_spec_for("NVIDIA H100 PCIe") is None and R.gpu_spec_for("AMD EPYC") is None
    assert R.GPU_SPECS["h100-sxm"][:2] == (989e12, 3.35e12) and R.GPU_SPECS["h200"][:2] == (989e12, 4.8e12)


def test_ratio_block():
    cfg = {k: getattr(make_config("tiny-llama"), k) for k in
           ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")}
    meta = {"dtype": "float32", "models": {"target": {"config": cfg}, "draft": {"config": cfg}},
            "device": {"roofline": {"peak_flops": 1e9, "bandwidth_bytes_per_s": 1e9, "source": "test"}}}
    rows = [dict(model=m, phase=ph, batch=b, tokens=t, context=c, median_s=1e-3 * b, p10_s=0, p90_s=0, samples=3,
                 status="ok")
            for m in ("draft", "target") for b in (1, 4) for ph, t, c in
            (("decode", 1, 16), ("decode", 1, 64), ("verify", 5, 16), ("verify", 3, 16), ("prefill", 32, 0))
            if not (m == "draft" and ph == "verify")]
    block = R.roofline_ratios(pd.DataFrame(rows), meta)
    d = block["phases"]["draft decode"]["batch1"]
    assert d["context"] == 16 and d["bound_s"] == pytest.approx(437.248e-6) and d["ratio"] == pytest.approx(1 / 0.437248)
    v = block["phases"]["verify"]["batch4"]
    assert (v["tokens"], v["gamma"], v["batch"]) == (5, 4, 4)
    assert block["phases"]["prefill"]["batch1"]["tokens"] == 32
    assert "ratio" in R.format_ratios(block)


def test_measure_host_is_positive():
    import torch

    m = R.measure_host("cpu", torch.float32, copy_bytes=1 << 20, n=64, repeats=2)
    assert m["bandwidth_bytes_per_s"] > 0 and m["peak_flops"] > 0 and "measured" in m["source"]


def test_launch_bound_warning_only_above_three_times_the_bound():
    """Batch-1 decode 3.5x its bound warns (naming the phase and both times); 2.9x does not."""
    def block(ratio):
        e = {"batch": 1, "tokens": 1, "context": 16, "measured_s": ratio * 1e-3, "bound_s": 1e-3, "ratio": ratio}
        return {"phases": {"target decode": {"batch1": e}, "draft decode": {"batch1": {**e, "ratio": 1.0}}}}
    assert R.launch_bound_warnings(block(2.9)) == []
    (line,) = R.launch_bound_warnings(block(3.5))
    assert "target decode at batch 1 takes 3.5x its roofline bound" in line and "3.500 ms against 1.000 ms" in line
    assert R.launch_bound_warnings({"note": "no device roofline figures"}) == []
