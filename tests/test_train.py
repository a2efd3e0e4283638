"""`train.py` run as a user runs it: outputs, config files, resume after a
real kill, sharded and multi-process training."""

import contextlib
import csv
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_mtp  # registers the classes load_model needs
from keras_mtp import checkpoint
from keras_mtp.callbacks import global_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# 5 evaluations on a tiny Llama over a small slice of the stdlib: 4 of 8
# steps, then one of 4 (36 steps: eval_interval does not divide them).
TINY = [
    "--steps=36",
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
    "--log-interval=3",
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


def run(args, env=None, timeout=600, stderr=False):
    """`args`' stdout (and stderr with `stderr`), asserting success."""
    result = subprocess.run(
        args,
        env=env or environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return (result.stdout, result.stderr) if stderr else result.stdout


def corrupt(directory):
    """Overwrites every file below `directory` (a checkpoint)."""
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "w") as f:
                f.write("corrupt")


def metrics_file(output_dir, name):
    with open(os.path.join(output_dir, name)) as f:
        return list(csv.DictReader(f))


def metrics(output_dir):
    return metrics_file(output_dir, "metrics.csv")


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
        "train_losses.csv",
        "best.keras",
        "model.keras",
        "losses.png",
    ):
        assert os.path.exists(os.path.join(output_dir, name)), name
    # Orbax keeps the checkpoints of the last two evaluations.
    assert sorted(os.listdir(os.path.join(output_dir, "checkpoints"))) == [
        "3",
        "4",
    ]
    rows = metrics(output_dir)
    assert len(rows) == 5
    for key in METRICS + ("val_loss", "mtp_accuracy_1"):
        assert np.isfinite(float(rows[-1][key])), key
    assert float(rows[-1]["main_loss"]) < float(rows[0]["main_loss"])
    with open(os.path.join(output_dir, "config.json")) as f:
        assert json.load(f)["steps"] == 36
    assert os.listdir(os.path.join(output_dir, "tensorboard"))
    # Exactly --steps: the last evaluation interval is cut to 4 steps.
    assert "Final metrics after 36 steps" in stdout
    assert "mean over the last 4 steps" in stdout
    assert "MTP depth 2 (token +3)" in stdout
    model = keras.models.load_model(os.path.join(output_dir, "model.keras"))
    assert global_step(model) == 36
    # Throughput in every row; MFU needs a known peak, not a CPU's.
    for row in rows:
        assert float(row["tokens_per_second"]) > 0
        assert row["mfu"] == "n/a"
    assert "MFU n/a" in stdout
    # Training FLOPs per token, counted by hand: d=16, f=32, T=32, V=320
    # (258 bytes padded to 64s), 4 query heads of 4, 2 key/value heads, one
    # trunk block and D=2 depths (each: a block, a 2d -> d projection, the
    # head again); x3 for forward + backward.
    d, f, T, V, D = 16, 32, 32, 320, 2
    block = 2 * (d * d + 2 * d * d // 2 + d * d + 3 * d * f) + 4 * T * d
    forward = (1 + D) * block + D * 2 * 2 * d * d + (1 + D) * 2 * d * V
    assert f"{3 * forward:,} training FLOPs per token" in stdout
    # The whole corpus is text: every byte became a token.
    assert "from 100.0% of its" in stdout
    # Training losses every 3 steps (and at each evaluation): their
    # step-weighted mean over an evaluation interval is its logged loss.
    with open(os.path.join(output_dir, "train_losses.csv")) as f:
        fine = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in fine]
    assert steps == [3, 6, 8, 11, 14, 16, 19, 22, 24, 27, 30, 32, 35, 36]
    for epoch, row in enumerate(rows):
        start, end = 8 * epoch, min(8 * epoch + 8, 36)
        previous, total = start, 0.0
        for step, fine_row in zip(steps, fine):
            if start < step <= end:
                total += (step - previous) * float(fine_row["main_loss"])
                previous = step
        np.testing.assert_allclose(
            total / (end - start), float(row["main_loss"]), rtol=1e-5
        )


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


def test_config_file_values_pass_the_flags_checks(tmp_path, capsys):
    sys.path.insert(0, ROOT)
    import train

    def parse(text):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        return train.parse_config([f"--config={path}"])

    # argparse checks `type` and `choices` on strings only: a YAML value
    # goes through the same checks as its flag's text.
    for text, message in [
        ("mtp_schedule: DeepSeek\n", "invalid choice: 'DeepSeek'"),
        ("steps: 20.5\n", "invalid int value: '20.5'"),
        ("packing: maybe\n", "expected true or false, got 'maybe'"),
        ("mtp_num_layers: true\n", "invalid int value: 'true'"),
    ]:
        with pytest.raises(SystemExit):
            parse(text)
        error = capsys.readouterr().err
        assert message in error and "run.yaml" in error, error
    config = parse(
        "steps: 20\npacking: true\nlearning_rate: 1\nloss_chunk_size: null\n"
    )
    assert (config.steps, config.packing) == (20, True)
    assert config.learning_rate == 1.0 and type(config.learning_rate) is float
    assert config.loss_chunk_size is None


# A value out of range for every numeric knob (the first three
# included): refused by parse_config, as a flag and from a config file, and
# by Config itself, naming the field and the value; nothing is built.
OUT_OF_RANGE = [
    ("steps", "-3"),
    ("eval_interval", "0"),
    ("eval_steps", "0"),
    ("steps", "0"),
    ("hidden_dim", "0"),
    ("num_layers", "0"),
    ("num_heads", "0"),
    ("intermediate_dim", "0"),
    ("mtp_num_layers", "-1"),
    ("mtp_loss_scaling_factor", "-0.1"),
    ("mtp_loss_scaling_factor", "nan"),
    ("mtp_schedule_switch", "-0.1"),
    ("mtp_schedule_switch", "1.5"),
    ("loss_chunk_size", "0"),
    ("validation_fraction", "0.0"),
    ("validation_fraction", "1.0"),
    ("sequence_length", "0"),
    ("batch_size", "0"),
    ("learning_rate", "0.0"),
    ("learning_rate", "inf"),
    ("warmup_steps", "-1"),
    ("min_learning_rate_ratio", "-0.1"),
    ("min_learning_rate_ratio", "1.5"),
    ("log_interval", "0"),
    ("seed", "-1"),
    ("seed", "4294967296"),
    ("num_processes", "0"),
    ("process_id", "-1"),
]


def numeric_fields(train):
    return [
        field.name
        for field in dataclasses.fields(train.Config)
        if train._field_type(field) in (int, float)
    ]


@pytest.mark.parametrize("name, text", OUT_OF_RANGE)
def test_out_of_range_values_are_refused_before_anything_is_built(
    name, text, tmp_path, capsys
):
    sys.path.insert(0, ROOT)
    import train

    received = f"Received: {name}={text}"
    flag = f"--{name.replace('_', '-')}={text}"
    with pytest.raises(SystemExit):
        train.parse_config([flag])
    error = capsys.readouterr().err
    assert f"`{name}` must be" in error and received in error, error
    path = tmp_path / "run.yaml"
    path.write_text(f"{name}: {text}\n")
    with pytest.raises(SystemExit):
        train.parse_config([f"--config={path}"])
    error = capsys.readouterr().err
    assert received in error and "run.yaml" in error, error
    value = train._field_type(train._FIELDS[name])(text)
    with pytest.raises(ValueError, match=re.escape(received)):
        train.Config(**{name: value})


def test_every_numeric_knob_has_its_range():
    sys.path.insert(0, ROOT)
    import train

    assert sorted(numeric_fields(train)) == sorted(
        {name for name, _ in OUT_OF_RANGE}
    )
    # Each range's closed ends are values a run takes.
    config = train.parse_config(
        [
            "--mtp-num-layers=0",
            "--mtp-loss-scaling-factor=0",
            "--mtp-schedule-switch=1",
            "--min-learning-rate-ratio=0",
            "--warmup-steps=0",
            "--seed=4294967295",
            "--steps=1",
            "--loss-chunk-size=1",
            "--process-id=0",
        ]
    )
    assert (config.mtp_num_layers, config.seed) == (0, 2**32 - 1)
    train.Config(mtp_schedule_switch=0.0, min_learning_rate_ratio=1.0)
    assert "(an int >= 1)" in train._help(train._FIELDS["steps"])


# Runs train.py and exits like a SIGKILL right after the checkpoint of the
# third evaluation (step 24) is complete: the instant after which a row
# written later would be lost.
KILL_AFTER_CHECKPOINT = """
import os, sys
sys.path.insert(0, {root!r})
import keras
import train

save = keras.callbacks.OrbaxCheckpoint.on_epoch_end

def save_then_die(self, epoch, logs=None):
    save(self, epoch, logs)
    if epoch == 2:
        self.wait_until_finished()
        os._exit(9)

keras.callbacks.OrbaxCheckpoint.on_epoch_end = save_then_die
train.main(train.parse_config({args!r}))
"""


def test_resume_after_kill_and_corrupt_checkpoint_matches_uninterrupted_run(
    corpus, reference_run, tmp_path
):
    """Killed right after a checkpoint, which is then corrupted: the rerun
    says so, moves it aside (kept), resumes from the one before, writes
    that number again and ends with the uninterrupted run's history."""
    output_dir = tmp_path / "run"
    args = command(output_dir, corpus)[2:]
    script = KILL_AFTER_CHECKPOINT.format(root=ROOT, args=args)
    killed = subprocess.run(
        [sys.executable, "-c", script],
        env=environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == 9, killed.stderr[-4000:]
    assert not os.path.exists(output_dir / "losses.png")  # did not finish
    # Every epoch of the checkpoint was logged before it was written.
    assert len(metrics(output_dir)) == 3
    checkpoints = output_dir / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["1", "2"]
    corrupt(checkpoints / "2")
    stdout, stderr = run(command(output_dir, corpus), stderr=True)
    aside = output_dir / "checkpoints.corrupt"
    assert f"Cannot restore {checkpoints / '2'}" in stderr
    assert f"Moved {checkpoints / '2'} to {aside / '2'}" in stderr
    assert "resuming at step 16" in stdout
    assert os.listdir(aside) == ["2"]  # kept as it was
    with open(next(p for p in aside.rglob("*") if p.is_file())) as f:
        assert f.read() == "corrupt"
    assert sorted(os.listdir(checkpoints)) == ["3", "4"]
    reference = reference_run[0]
    assert_same_history(metrics(output_dir), metrics(reference), 1e-6)
    fine, fine_reference = (
        metrics_file(directory, "train_losses.csv")
        for directory in (output_dir, reference)
    )
    assert [r["step"] for r in fine] == [r["step"] for r in fine_reference]
    assert_same_history(fine, fine_reference, 1e-6, keys=METRICS[:4])


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


def launch_two_processes(output_dir, corpus, *flags, quiet_second=False):
    """`train.py` as two JAX processes of 4 CPU devices each (gloo over
    127.0.0.1), stdout piped (process 1's dropped with `quiet_second`)."""
    address = f"127.0.0.1:{free_port()}"
    return [
        subprocess.Popen(
            command(output_dir, corpus, *flags),
            env=environment(
                XLA_FLAGS="--xla_force_host_platform_device_count=4",
                KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
                KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                KERAS_DISTRIBUTION_PROCESS_ID=str(i),
            ),
            cwd=ROOT,
            stdout=subprocess.DEVNULL
            if quiet_second and i == 1
            else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def test_two_processes_match_one(corpus, reference_run, tmp_path):
    jax_only()
    processes = launch_two_processes(
        tmp_path / "run", corpus, "--distribution=data"
    )
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for i, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, out[-4000:]
        assert f"on 8 devices, process {i}/2" in out
    # Process 1 reads the token file process 0 wrote, beside the run.
    assert os.listdir(tmp_path / ".token_cache")
    assert not os.path.exists(tmp_path / "run" / "process_1" / ".token_cache")
    assert not os.path.exists(tmp_path / "run" / ".token_cache")
    reference = metrics(reference_run[0])
    assert_same_history(metrics(tmp_path / "run"), reference, 1e-5)
    assert_same_history(
        metrics(tmp_path / "run" / "process_1"), reference, 1e-5
    )


def test_checkpoint_fallback_and_errors(tmp_path, capsys):
    jax_only()  # Orbax checkpoints are written the same way on every backend
    sys.path.insert(0, ROOT)
    import train

    def tiny(**overrides):
        config = train.Config(
            hidden_dim=16,
            num_heads=4,
            num_layers=1,
            intermediate_dim=32,
            sequence_length=12,
            steps=10,
            warmup_steps=1,
            output_dir=str(tmp_path / "run"),
            **overrides,
        )
        keras.utils.clear_session()  # the same variable paths every time
        keras.utils.set_random_seed(0)
        return config, train.build_model(config, 64)

    config, model = tiny()
    directory = train.checkpoint_directory(config)
    x = {
        "token_ids": np.arange(48).reshape(4, 12) % 64,
        "padding_mask": np.ones((4, 12), "int32"),
    }
    saver = keras.callbacks.OrbaxCheckpoint(directory, max_to_keep=3)
    model.fit(x, x["token_ids"], epochs=3, callbacks=[saver], verbose=0)
    expected = model.predict(x, verbose=0)

    def restored(model):
        number = checkpoint.restore_checkpoint(model, directory)
        return number, global_step(model)

    # Killed mid-write: Orbax's temporary directory is not a checkpoint.
    partial = os.path.join(directory, "3.orbax-checkpoint-tmp-1")
    os.makedirs(partial)
    with open(os.path.join(partial, "junk"), "w") as f:
        f.write("partial")
    _, fresh = tiny()
    assert restored(fresh) == (2, 3)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, atol=1e-6)

    # A corrupt newest checkpoint: said so, the one before it is used, and
    # it is moved aside (Orbax would refuse to write its number again),
    # beside what an earlier corruption left there, replacing nothing.
    corrupt(os.path.join(directory, "2"))
    aside = directory + ".corrupt"
    os.makedirs(os.path.join(aside, "2"))
    _, fresh = tiny()
    assert restored(fresh) == (1, 2)
    err = capsys.readouterr().err
    assert "Cannot restore " + os.path.join(directory, "2") in err
    assert f"Moved {directory}/2 to {aside}/2-1" in err
    assert sorted(os.listdir(aside)) == ["2", "2-1"]
    assert os.listdir(os.path.join(aside, "2")) == []
    assert checkpoint.complete_checkpoints(directory) == [1, 0]

    # A checkpoint of another model (2 MTP depths, not 1) does not load:
    # an error, never a silent start from step 0, and nothing is moved.
    _, other = tiny(mtp_num_layers=1)
    with pytest.raises(ValueError, match="No checkpoint in .* can be restored"):
        checkpoint.restore_checkpoint(other, directory)
    assert checkpoint.complete_checkpoints(directory) == [1, 0]

    # The run directory of another config is refused before any loading.
    with open(os.path.join(config.output_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f)
    with pytest.raises(ValueError, match=r"another config .*'steps'"):
        train.set_up(dataclasses.replace(config, steps=12))


def test_two_processes_killed_resume_and_reshard(
    corpus, reference_run, tmp_path
):
    """Model parallel over 2 processes (gloo) x 4 devices: SIGKILLed
    mid-run, rerun, same history as one device; its sharded checkpoint then
    restores in one process on 8 devices and on 1 device alike."""
    jax_only()
    output_dir = tmp_path / "run"
    flags = ["--distribution=model", "--mesh=2,4"]

    def launch():
        return launch_two_processes(
            output_dir, corpus, *flags, quiet_second=True
        )

    processes = launch()
    for line in processes[0].stdout:  # epochs 0-2 done and checkpointed
        if line.startswith("Epoch 4/5"):
            break
    for p in processes:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=600)
    processes = launch()
    out = processes[0].communicate(timeout=600)[0]
    processes[1].wait(timeout=600)
    assert [p.returncode for p in processes] == [0, 0], out[-4000:]
    # The checkpoint of epoch 2 may still have been in flight: 16 or 24.
    assert "resuming at step 16" in out or "resuming at step 24" in out
    assert_same_history(metrics(output_dir), metrics(reference_run[0]), 1e-5)
    assert not os.path.exists(output_dir / "model.keras")  # not addressable

    sys.path.insert(0, ROOT)
    import train

    config = train.parse_config(command(output_dir, corpus, *flags)[2:])
    x = {
        "token_ids": np.arange(4 * 32).reshape(4, 32) % 250 + 2,
        "padding_mask": np.ones((4, 32), "int32"),
    }
    predictions = []
    distribution = keras_mtp.distribution.make_distribution(
        config.distribution,
        config.backbone,
        config.mtp_num_layers,
        config.batch_size,
        config.mesh,
    )
    for distribution in (distribution, None):
        keras.utils.clear_session()  # the variable paths of a fresh process
        scope = (
            distribution.scope() if distribution else contextlib.nullcontext()
        )
        with scope:
            model = train.make_model(config, 320)
            assert global_step(model) == 36
            predictions.append(model.predict(x, verbose=0))
    np.testing.assert_allclose(predictions[0], predictions[1], atol=1e-5)


def test_packing_trains_with_documents_kept_apart(corpus, tmp_path):
    """`--packing=true` trains on rows of packed files (segment ids in every
    batch), and the model it saves keeps packed documents apart: a file's
    second half after another document gives the logits it gives alone."""
    output_dir = tmp_path / "packed"
    stdout = run(
        command(output_dir, corpus, "--packing=true", "--steps=8")
        + ["--eval-interval=8", "--mtp-num-layers=1"]
    )
    assert "Final metrics after 8 steps" in stdout
    rows = metrics(output_dir)
    for key in ("loss", "main_loss", "mtp_loss_1", "val_loss"):
        assert np.isfinite(float(rows[-1][key])), key
    with open(os.path.join(output_dir, "config.json")) as f:
        assert json.load(f)["packing"] is True
    model = keras.models.load_model(os.path.join(output_dir, "model.keras"))
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 256, size=(2, 16)).astype("int32")
    ones = np.ones((1, 32), "int32")
    packed = {
        "token_ids": np.concatenate([a, b])[None],
        "padding_mask": ones,
        "segment_ids": np.repeat([[1, 2]], 16, axis=1).astype("int32"),
    }
    alone = {"token_ids": b[None], "padding_mask": ones[:, :16]}
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(packed))[0, 16:],
        keras.ops.convert_to_numpy(model(alone))[0],
        atol=1e-5,
    )


def test_packing_is_refused_for_qwen3_5_before_anything_is_built(capsys):
    sys.path.insert(0, ROOT)
    import train

    for name in ("qwen3_5", "qwen3_5_moe"):
        with pytest.raises(SystemExit):
            train.parse_config([f"--backbone={name}", "--packing=true"])
        error = capsys.readouterr().err
        assert "--packing: Packed rows" in error, error
        assert f"'{name}' family" in error, error
