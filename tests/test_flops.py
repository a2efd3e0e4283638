import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from keras_mtp import flops

# d=2, f=3, T=5, V=7, L=3, by hand:
#   block = 8·4 + 4·2·3 + 4·5·2 = 32 + 24 + 40 = 96
#   head  = 2·2·7 = 28
#   depth = 96 + 4·4 + 28 = 140
#   trunk = 3·96 + 28 = 316
SMALL = dict(d=2, f=3, T=5, V=7, L=3)


def test_formulas_on_small_sizes():
    assert flops.block_flops(2, 3, 5) == 96
    assert flops.head_flops(2, 7) == 28
    assert flops.depth_flops(2, 3, 5, 7) == 140
    assert flops.mtp_overhead(**SMALL, D=1) == pytest.approx(140 / 316)
    assert flops.mtp_overhead(**SMALL, D=2) == pytest.approx(280 / 316)
    assert flops.predicted_step_ratio(**SMALL, D=2) == pytest.approx(
        1 + 280 / 316
    )


def test_each_term_alone():
    # 8d² with f = 0 is impossible (f >= 1), so vary one size at a time.
    assert flops.block_flops(1, 1, 1) == 8 + 4 + 4
    assert flops.block_flops(10, 1, 1) - flops.block_flops(9, 1, 1) == (
        8 * (100 - 81) + 4 + 4
    )
    assert flops.block_flops(2, 4, 1) - flops.block_flops(2, 3, 1) == 4 * 2
    assert flops.block_flops(2, 3, 6) - flops.block_flops(2, 3, 5) == 4 * 2
    assert flops.head_flops(3, 1000) == 6000


def test_no_depth_no_overhead():
    assert flops.mtp_overhead(**SMALL, D=0) == 0.0
    assert flops.predicted_step_ratio(**SMALL, D=0) == 1.0
    # Linear in D.
    one = flops.mtp_overhead(**SMALL, D=1)
    assert flops.mtp_overhead(**SMALL, D=4) == pytest.approx(4 * one)


def test_overhead_at_1b_and_7b():
    # 1B: d=2048 L=16 f=8192 T=4096 V=128256, by hand:
    #   block = 8·2048² + 4·2048·8192 + 4·4096·2048
    #         = 33_554_432 + 67_108_864 + 33_554_432 = 134_217_728 (2^27)
    #   head  = 2·2048·128256 = 525_336_576
    #   depth = 134_217_728 + 16_777_216 + 525_336_576 = 676_331_520
    #   trunk = 16·2^27 + 525_336_576 = 2_672_820_224
    #   overhead(1) = 676_331_520 / 2_672_820_224 = 645 / 2549 ≈ 25.3 %
    # The 128k-vocabulary head is 19.7 % of the trunk, so each depth (which
    # repeats the head) costs ~25 %, not 5–10 %.
    one_b = flops.SIZES["1B (Llama-3.2-1B-like)"]
    assert flops.block_flops(one_b["d"], one_b["f"], one_b["T"]) == 2**27
    assert flops.depth_flops(
        one_b["d"], one_b["f"], one_b["T"], one_b["V"]
    ) == (676_331_520)
    assert flops.mtp_overhead(**one_b, D=1) == pytest.approx(
        float(Fraction(645, 2549)), rel=1e-12
    )
    assert flops.mtp_overhead(**one_b, D=1) == pytest.approx(0.2530, abs=1e-4)
    # 7B: d=4096 L=32 f=11008 T=4096 V=32000, by hand:
    #   block = 134_217_728 + 180_355_072 + 67_108_864 = 381_681_664
    #   head  = 2·4096·32000 = 262_144_000
    #   depth = 381_681_664 + 67_108_864 + 262_144_000 = 710_934_528
    #   trunk = 32·381_681_664 + 262_144_000 = 12_475_957_248
    #   overhead(1) = 113 / 1983 ≈ 5.70 %: inside 5–10 % per depth.
    seven_b = flops.SIZES["7B (Llama-2-7B-like)"]
    assert flops.mtp_overhead(**seven_b, D=1) == pytest.approx(
        float(Fraction(113, 1983)), rel=1e-12
    )
    assert 0.05 <= flops.mtp_overhead(**seven_b, D=1) <= 0.10
    assert flops.mtp_overhead(**seven_b, D=4) == pytest.approx(
        4 * 113 / 1983, rel=1e-12
    )


def test_overhead_table_rows():
    rows = flops.overhead_table()
    assert [(r["model"][:2], r["D"]) for r in rows] == [
        ("1B", 1),
        ("1B", 2),
        ("1B", 4),
        ("7B", 1),
        ("7B", 2),
        ("7B", 4),
    ]
    text = flops.format_table(rows)
    assert "| 25.3 % | 1.253 |" in text
    assert "| 22.8 % | 1.228 |" in text  # 7B, D = 4


def test_bad_sizes():
    with pytest.raises(ValueError, match="d=0"):
        flops.block_flops(0, 3, 5)
    with pytest.raises(ValueError, match=r"D=-1"):
        flops.mtp_overhead(**SMALL, D=-1)
    with pytest.raises(ValueError, match="V=2.5"):
        flops.head_flops(2, 2.5)


def test_module_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "keras_mtp.flops"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.count("Llama-2-7B-like") == 3
    assert "| 50.6 % | 1.506 |" in out


# === Throughput: FLOPs counted on a built model ===


def _train_llama(D, d=64, layers=2, heads=4, f=128, T=32, V=64):
    """train.py's Llama (GQA: 2 key/value heads of 4) with `D` depths."""
    import keras
    import numpy as np

    import keras_mtp
    from keras_mtp import backbones

    backbone = backbones.build_backbone("llama", V, d, layers, heads, f, T)
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=D)
    x = {
        "token_ids": np.ones((2, T), "int32"),
        "padding_mask": np.ones((2, T), "int32"),
    }
    model(x)
    assert keras.config.backend() in ("jax", "tensorflow", "torch")
    return model, x


def test_model_flops_match_a_hand_count():
    # train.py's llama: 4 query heads of 16, 2 key/value heads (GQA), a
    # gated FFN (3 matrices), a tied 64 x 64 head. Per token, by hand:
    d, f, T, V, hd = 64, 128, 32, 64, 16
    block = d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d + 3 * d * f  # weights
    attention = 4 * T * d
    for D in (0, 2):
        model, _ = _train_llama(D)
        expected = (
            2 * (2 + D) * block  # 2 trunk blocks, one per depth
            + 2 * D * (2 * d * d)  # each depth's 2d -> d projection
            + 2 * (1 + D) * d * V  # the head: main and every depth
            + (2 + D) * attention
        )
        assert flops.forward_flops_per_token(model, T) == expected
        assert flops.training_flops_per_token(model, T) == 3 * expected


def test_model_flops_match_xla_cost_analysis():
    # An independent count: XLA's own FLOPs of the compiled training-mode
    # forward pass (MTP depths run), which also counts norms and softmax.
    import keras

    if keras.config.backend() != "jax":
        pytest.skip("XLA cost analysis: JAX only (the count is backend-free)")
    import jax

    counted = {}
    for D in (0, 2):
        model, x = _train_llama(D)

        def forward(trainable, non_trainable, x):
            return model.stateless_call(
                trainable, non_trainable, x, training=True
            )[0]

        values = [
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        ]
        cost = jax.jit(forward).lower(*values, x).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        xla = cost["flops"] / x["token_ids"].size
        counted[D] = flops.forward_flops_per_token(model, 32)
        # Norms, softmax, RoPE and SiLU: a few % at d = 64.
        assert counted[D] == pytest.approx(xla, rel=0.06), D
        counted[D, "xla"] = xla
    depths = (counted[2] - counted[0]) / (counted[2, "xla"] - counted[0, "xla"])
    assert depths == pytest.approx(1.0, rel=0.06)


def test_peak_flops_and_mfu():
    assert flops.peak_flops_per_device("TPU v4") == 275e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("TPU v5p") == 459e12
    assert flops.peak_flops_per_device("TPU v6 lite") == 918e12
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
    assert flops.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops_per_device("cpu") is None
    # 1000 tokens/s x 3e9 FLOPs / (2 x 1e12) = 1.5.
    assert flops.model_flops_utilization(1000, 3e9, 2e12) == 1.5
    assert np.isnan(flops.model_flops_utilization(1000, 3e9, None))
