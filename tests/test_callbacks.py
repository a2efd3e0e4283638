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
