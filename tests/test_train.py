"""`train.py` run as a user runs it: outputs, config files, resume after a
real kill, sharded and multi-process training."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_mtp  # noqa: F401  (registers the classes load_model needs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# 5 evaluations of 8 steps on a tiny Llama over a small slice of the stdlib.
TINY = [
    "--steps=40",
    "--eval-interval=8",
    "--eval-steps=2",
    "--sequence-length=32",
    "--batch-size=8",
    "--hidden-dim=16",
    "--num-heads=4",
    "--num-layers=1",
    "--intermediate-dim=32",
    "--warmup-steps=4",
    "--learning-rate=1e-2",
]
METRICS = ("loss", "main_loss", "mtp_loss_1", "mtp_loss_2", "val_mtp_loss_2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A fixed 60-file slice of the standard library (fast to tokenize)."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    directory = tmp_path_factory.mktemp("corpus")
    names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))
    for name in names[:60]:
        os.symlink(os.path.join(stdlib, name), directory / name)
    return str(directory)


def command(output_dir, corpus, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *TINY,
        f"--data={corpus}",
        f"--output-dir={output_dir}",
        *extra,
    ]


def environment(**extra):
    env = {
        **os.environ,
        "KERAS_BACKEND": keras.config.backend(),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def run(args, env=None, timeout=600):
    result = subprocess.run(
        args,
        env=env or environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def assert_same_history(rows, reference, rtol, keys=METRICS):
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference):
        for key in keys:
            np.testing.assert_allclose(
                float(row[key]), float(ref[key]), rtol=rtol, err_msg=key
            )


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("reference")
    stdout = run(command(output_dir, corpus))
    return output_dir, stdout


def test_run_directory_holds_everything(reference_run):
    output_dir, stdout = reference_run
    for name in (
        "config.json",
        "metrics.csv",
        "best.keras",
        "last.keras",
        "losses.png",
    ):
        assert os.path.exists(os.path.join(output_dir, name)), name
    rows = metrics(output_dir)
    assert len(rows) == 5
    for key in METRICS + ("val_loss", "mtp_accuracy_1"):
        assert np.isfinite(float(rows[-1][key])), key
    assert float(rows[-1]["main_loss"]) < float(rows[0]["main_loss"])
    with open(os.path.join(output_dir, "config.json")) as f:
        assert json.load(f)["steps"] == 40
    assert os.listdir(os.path.join(output_dir, "tensorboard"))
    assert "Final metrics after 40 steps" in stdout
    assert "MTP depth 2 (token +3)" in stdout
    model = keras.models.load_model(os.path.join(output_dir, "last.keras"))
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 40


def test_config_file_then_flags(corpus, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("mtp_num_layers: 1\nmtp_schedule: deepseek\nsteps: 16\n")
    output_dir = tmp_path / "run"
    run(command(output_dir, corpus, f"--config={config}", "--steps=24"))
    with open(output_dir / "config.json") as f:
        saved = json.load(f)
    assert saved["mtp_num_layers"] == 1 and saved["steps"] == 24  # flag wins
    rows = metrics(output_dir)
    assert "mtp_loss_2" not in rows[0]
    # deepseek: λ 0.3 until 0.7 · 24 = 16.8 steps, then 0.1.
    assert [float(r["mtp_loss_scaling_factor"]) for r in rows] == [
        0.3,
        0.3,
        0.1,
    ]
    bad = tmp_path / "bad.json"
    bad.write_text('{"mtp_num_layer": 1}')
    result = subprocess.run(
        command(tmp_path / "bad", corpus, f"--config={bad}"),
        env=environment(),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "mtp_num_layer" in result.stderr


def test_resume_after_kill_matches_uninterrupted_run(
    corpus, reference_run, tmp_path
):
    output_dir = tmp_path / "run"
    process = subprocess.Popen(
        command(output_dir, corpus),
        env=environment(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # "Epoch 3/5" is printed once epoch 2 has been checkpointed.
    for line in process.stdout:
        if line.startswith("Epoch 3/5"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=600)
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(output_dir / "losses.png")  # did not finish
    stdout = run(command(output_dir, corpus))
    assert "resuming at step 16" in stdout
    assert_same_history(metrics(output_dir), metrics(reference_run[0]), 1e-6)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jax_only():
    if keras.config.backend() != "jax":
        pytest.skip("keras.distribution runs on the JAX backend only")


@pytest.mark.parametrize(
    "flags", [["--distribution=data"], ["--distribution=model", "--mesh=2,4"]]
)
def test_sharded_training_matches_one_device(
    corpus, reference_run, tmp_path, flags
):
    jax_only()
    env = environment(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    stdout = run(command(tmp_path / "run", corpus, *flags), env=env)
    assert "on 8 devices" in stdout
    # Same data, same initial weights; only the reduction order differs.
    assert_same_history(
        metrics(tmp_path / "run"), metrics(reference_run[0]), 1e-5
    )


def test_two_processes_match_one(corpus, reference_run, tmp_path):
    jax_only()
    address = f"127.0.0.1:{free_port()}"
    processes = [
        subprocess.Popen(
            command(tmp_path / "run", corpus, "--distribution=data"),
            env=environment(
                XLA_FLAGS="--xla_force_host_platform_device_count=4",
                KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
                KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                KERAS_DISTRIBUTION_PROCESS_ID=str(i),
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for i, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, out[-4000:]
        assert f"on 8 devices, process {i}/2" in out
    reference = metrics(reference_run[0])
    assert_same_history(metrics(tmp_path / "run"), reference, 1e-5)
    assert_same_history(
        metrics(tmp_path / "run" / "process_1"), reference, 1e-5
    )
