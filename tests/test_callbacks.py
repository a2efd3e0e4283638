"""The MTP metrics reach every Keras callback, in fit and in validation."""

import csv
import glob
import os

import keras
import numpy as np
import pytest
from conftest import make_backbone
from conftest import make_batch

import keras_mtp


def test_csv_logger_tensorboard_and_early_stopping_see_mtp_metrics(tmp_path):
    model = keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, w = make_batch(pad_last=2)
    csv_path = os.path.join(tmp_path, "metrics.csv")
    log_dir = os.path.join(tmp_path, "tb")
    # Keras infers the mode only for "loss" and compiled metrics, so
    # model-level metrics need an explicit one. The validation MTP loss falls
    # every epoch here, so mode="max" stops after the second epoch: proof that
    # EarlyStopping reads it (a missing metric only warns and trains on).
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_mtp_loss_2", mode="max", patience=1
    )
    history = model.fit(
        x,
        y,
        sample_weight=w,
        validation_data=(x, y, w),
        epochs=10,
        callbacks=[
            keras.callbacks.CSVLogger(csv_path),
            keras.callbacks.TensorBoard(log_dir),
            stopper,
        ],
        verbose=0,
    )
    assert len(history.history["loss"]) == 2
    assert stopper.stopped_epoch == 1
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    keys = ("main_loss", "mtp_loss", "mtp_loss_1", "mtp_accuracy_2")
    for key in keys + ("mtp_acceptance_1", "mtp_acceptance_2"):
        for prefix in ("", "val_"):
            values = [float(row[prefix + key]) for row in rows]
            assert np.all(np.isfinite(values)), prefix + key

    from tensorboard.backend.event_processing import event_accumulator

    tags = set()
    for run in ("train", "validation"):
        for path in glob.glob(os.path.join(log_dir, run, "events.*")):
            events = event_accumulator.EventAccumulator(path)
            events.Reload()
            tags |= {f"{run}/{tag}" for tag in events.Tags()["tensors"]}
    for tag in (
        "epoch_mtp_loss_1",
        "epoch_mtp_loss_2",
        "epoch_mtp_accuracy_1",
        "epoch_mtp_acceptance_2",
    ):
        assert f"train/{tag}" in tags and f"validation/{tag}" in tags, tags


def test_scheduler_resumes_its_step_after_backup_and_restore(tmp_path):
    # The scheduler is listed before BackupAndRestore, which restores the
    # optimizer's step in its own on_train_begin: λ must follow that step.
    x, y, w = make_batch(batch=8)
    backup = os.path.join(tmp_path, "backup")
    seen = []

    def schedule(step):
        seen.append(step)
        return 0.3 if step < 3 else 0.1

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("preempted")

    def run(extra):
        keras.utils.set_random_seed(0)
        model = keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=2)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        callbacks = [
            keras_mtp.callbacks.MTPLossScheduler(schedule),
            keras.callbacks.BackupAndRestore(backup),
            *extra,
        ]
        history = model.fit(
            x,
            y,
            sample_weight=w,
            batch_size=4,
            epochs=3,
            shuffle=False,
            callbacks=callbacks,
            verbose=0,
        )
        return model, history.history

    try:
        run([Interrupt()])
    except RuntimeError:
        pass
    assert seen == [0, 1, 2, 3]  # two epochs of two steps, then preempted
    seen.clear()
    model, history = run([])
    assert seen == [4, 5]  # the third epoch, not step 0 again
    assert model.mtp_loss_scaling_factor == pytest.approx(0.1)
    assert history["mtp_loss_scaling_factor"] == [pytest.approx(0.1)]


def warmup_cosine_numpy(peak, steps, warmup, ratio, step):
    """The schedule written out: linear warmup, then cosine to ratio·peak."""
    warmup = min(warmup, steps - 1)
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, steps - warmup) / (steps - warmup)
    cosine = 0.5 * (1 + np.cos(np.pi * progress))
    return peak * ((1 - ratio) * cosine + ratio)


@pytest.mark.parametrize(
    "steps, warmup, ratio", [(20, 5, 0.1), (20, 0, 0.0), (4, 30, 0.5)]
)
def test_warmup_cosine_matches_numpy(steps, warmup, ratio):
    schedule = keras_mtp.callbacks.warmup_cosine(3e-3, steps, warmup, ratio)
    for step in range(steps + 3):
        got = float(keras.ops.convert_to_numpy(schedule(step)))
        want = warmup_cosine_numpy(3e-3, steps, warmup, ratio, step)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=float("inf")), "learning_rate"),
        (dict(steps=0), "steps"),
        (dict(steps=True), "steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(min_learning_rate_ratio=1.5), "min_learning_rate_ratio"),
    ],
)
def test_warmup_cosine_refuses_bad_arguments(kwargs, name):
    arguments = {**dict(learning_rate=1e-3, steps=10), **kwargs}
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        keras_mtp.callbacks.warmup_cosine(**arguments)


def test_deepseek_v3_schedule():
    schedule = keras_mtp.callbacks.deepseek_v3_schedule(0.7 * 24)  # 16.8
    assert [schedule(s) for s in (0, 16, 17, 100)] == [0.3, 0.3, 0.1, 0.1]
    other = keras_mtp.callbacks.deepseek_v3_schedule(2, before=1.0, after=0)
    assert [other(s) for s in (1, 2)] == [1.0, 0]
    with pytest.raises(ValueError, match="switch_step"):
        keras_mtp.callbacks.deepseek_v3_schedule(-1)
    with pytest.raises(ValueError, match="λ"):
        keras_mtp.callbacks.deepseek_v3_schedule(5, before=-0.1)


def test_global_step_stop_at_step_and_metrics_csv(tmp_path):
    with pytest.raises(ValueError, match="compiled model or an optimizer"):
        keras_mtp.callbacks.global_step(keras.layers.Dense(2))
    model = keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert keras_mtp.callbacks.global_step(model) == 0
    # 12 rows in batches of 4: 3 steps per epoch. Stop after 5 steps: the
    # second epoch is cut short, and still logged.
    x, y, w = make_batch(batch=12)
    path = os.path.join(tmp_path, "metrics.csv")
    history = model.fit(
        x,
        y,
        sample_weight=w,
        batch_size=4,
        epochs=4,
        callbacks=[
            keras_mtp.callbacks.StopAtStep(5, steps_per_epoch=3),
            keras_mtp.callbacks.MetricsCSV(path),
        ],
        verbose=0,
    )
    assert keras_mtp.callbacks.global_step(model) == 5
    assert keras_mtp.callbacks.global_step(model.optimizer) == 5
    assert len(history.history["loss"]) == 2
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [row["mfu"] for row in rows] == ["n/a", "n/a"]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        keras_mtp.callbacks.StopAtStep(5, steps_per_epoch=0)
