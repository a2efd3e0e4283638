"""End-to-end test of `train.py`, run as a user would run it."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_script_tiny_run(tmp_path):
    output_dir = tmp_path / "run"
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--steps=4",
        "--eval-interval=2",
        "--eval-steps=1",
        "--sequence-length=32",
        "--batch-size=4",
        "--hidden-dim=16",
        "--num-layers=1",
        "--intermediate-dim=32",
        f"--output-dir={output_dir}",
    ]
    env = {
        **os.environ,
        "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax"),
    }
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    with open(output_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # 4 steps, an evaluation every 2
    for column in (
        "loss",
        "main_loss",
        "mtp_loss_1",
        "mtp_loss_2",
        "mtp_accuracy_2",
        "val_main_loss",
        "val_mtp_loss_1",
    ):
        assert column in rows[0], column
    assert (output_dir / "model.keras").exists()
    with open(output_dir / "config.json") as f:
        config = json.load(f)
    assert config["steps"] == 4 and config["mtp_num_layers"] == 2

    assert "Final metrics after 4 steps" in result.stdout
    assert "MTP depth 2 (token +3)" in result.stdout
