"""Keras callbacks for MTP training."""

import csv
import os
import time

import keras

from keras_mtp import flops
from keras_mtp.validation import check_loss_scaling_factor


class MTPLossScheduler(keras.callbacks.Callback):
    """Sets the MTP loss scaling factor `λ = schedule(step)` before each batch.

    `step` is the global count of training batches seen so far: 0-based,
    across epochs, and continued from `optimizer.iterations` when training
    resumes. The step is read at the first batch, after every callback's
    `on_train_begin`, so a `keras.callbacks.BackupAndRestore` restores it
    first wherever it stands in the list. The model's `λ` is a non-trainable
    weight, so a change needs no recompilation; it is only written when the
    value changes. The current `λ` is added to the epoch logs as
    `mtp_loss_scaling_factor`.

    Args:
        schedule: callable `int -> float`, the `λ` for a step.
        verbose: int. 1 prints each change of `λ`.

    Example (DeepSeek-V3: 0.3, then 0.1 after the first 10 000 steps):

    ```python
    scheduler = keras_mtp.callbacks.MTPLossScheduler(
        lambda step: 0.3 if step < 10_000 else 0.1)
    model.fit(ds, callbacks=[scheduler])
    ```
    """

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                f"`schedule` must be callable. Received: {schedule!r}"
            )
        self.schedule = schedule
        self.verbose = verbose
        self._epoch_start_step = None
        self._batches_in_epoch = 0
        self._current = None

    def on_train_begin(self, logs=None):
        model = self.model
        if getattr(model, "mtp_block", None) is None:
            raise ValueError(
                "MTPLossScheduler needs an MTPCausalLM with mtp_num_layers > 0."
                f" Received: {type(model).__name__} with mtp_num_layers="
                f"{getattr(model, 'mtp_num_layers', None)}"
            )
        self._epoch_start_step = None  # read at the first batch
        self._current = float(model.mtp_loss_scaling_factor)

    def on_epoch_begin(self, epoch, logs=None):
        self._batches_in_epoch = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._epoch_start_step is None:
            # Before the first step: on JAX the optimizer's variables are
            # still in the model here.
            iterations = self.model.optimizer.iterations
            self._epoch_start_step = int(keras.ops.convert_to_numpy(iterations))
            self._epoch_start_step -= batch
        step = self._epoch_start_step + batch
        value = self.schedule(step)
        check_loss_scaling_factor(value)
        value = float(value)
        if value != self._current:
            self.model.mtp_loss_scaling_factor = value
            if self.verbose:
                print(f"\nMTPLossScheduler: step {step}, λ = {value}")
            self._current = value

    def on_train_batch_end(self, batch, logs=None):
        self._batches_in_epoch = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_start_step += self._batches_in_epoch
        if logs is not None:
            logs["mtp_loss_scaling_factor"] = self._current


class Throughput(keras.callbacks.Callback):
    """Adds training throughput and MFU to every epoch's logs.

    `tokens_per_second` is global (all processes and devices): the tokens
    of the epoch's training steps over their wall time, validation left
    out (the first epoch includes compilation). `mfu` (model FLOPs
    utilization) is `tokens_per_second · flops_per_token / peak_flops`,
    left out of the logs where the peak is unknown (CPUs), so that no
    progress line or TensorBoard chart shows a NaN. Put it before the
    callbacks that write the logs (`CSVLogger`, `TensorBoard`).

    Args:
        tokens_per_step: int. Tokens of one global batch (batch × length).
        flops_per_token: float. Training FLOPs per token,
            `keras_mtp.flops.training_flops_per_token` (MTP depths
            included).
        peak_flops: float or None. Peak FLOP/s of all devices together
            (`keras_mtp.flops.peak_flops_per_device` × devices).
    """

    def __init__(self, tokens_per_step, flops_per_token, peak_flops=None):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._start = self._seconds = None
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._seconds, self._steps = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1

    def on_test_begin(self, logs=None):
        if self._start is not None and self._seconds is None:
            # Wait for the last step: JAX and TF dispatch asynchronously.
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            self._seconds = time.perf_counter() - self._start

    def on_epoch_end(self, epoch, logs=None):
        self.on_test_begin()  # no validation this epoch
        rate = self._steps * self.tokens_per_step / max(self._seconds, 1e-9)
        if logs is not None:
            logs["tokens_per_second"] = rate
            if self.peak_flops:
                logs["mfu"] = flops.model_flops_utilization(
                    rate, self.flops_per_token, self.peak_flops
                )


class TrainingLossLog(keras.callbacks.Callback):
    """Appends the training losses of every `interval` steps to a CSV file.

    Keras logs a training loss per epoch (the mean since the epoch began);
    this writes one row per `interval` steps (and one for an epoch's last,
    shorter window): `step` (global steps done) and the mean of `loss`,
    `main_loss`, `mtp_loss` and `mtp_loss_k` over the window, recovered
    exactly from Keras' running means (each batch weighs the same). Rows
    already in the file past the step training starts from are dropped, so
    a resumed run rewrites what it retrains.

    Args:
        path: str. The CSV file.
        interval: int >= 1. Steps per row.
    """

    def __init__(self, path, interval):
        super().__init__()
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"`interval` must be an int >= 1. Received: interval={interval}"
            )
        self.path = path
        self.interval = interval

    def on_train_begin(self, logs=None):
        iterations = self.model.optimizer.iterations
        self._epoch_start = int(keras.ops.convert_to_numpy(iterations))
        rows = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = list(csv.DictReader(f))
        rows = [r for r in rows if int(r["step"]) <= self._epoch_start]
        self._keys = list(rows[0]) if rows else None
        if self._keys:
            self._write(rows, mode="w")
        elif os.path.exists(self.path):
            os.remove(self.path)

    def on_epoch_begin(self, epoch, logs=None):
        self._done = 0  # batches of this epoch already written
        self._sums = {}  # key -> the sum of their values
        self._pending = None

    def on_train_batch_end(self, batch, logs=None):
        self._pending = (batch + 1, logs)
        if (batch + 1) % self.interval == 0:
            self._flush()

    def on_epoch_end(self, epoch, logs=None):
        if self._pending and self._pending[0] > self._done:
            self._flush()
        self._epoch_start += self._done

    def _flush(self):
        batches, logs = self._pending
        window = batches - self._done
        row = {"step": self._epoch_start + batches}
        for key, value in logs.items():
            if key == "mtp_loss_scaling_factor":
                continue
            if key == "loss" or key.startswith(("main_loss", "mtp_loss")):
                total = float(keras.ops.convert_to_numpy(value)) * batches
                row[key] = (total - self._sums.get(key, 0.0)) / window
                self._sums[key] = total
        self._done = batches
        if self._keys is None:
            self._keys = list(row)
            self._write([row], mode="w")
        else:
            self._write([row], mode="a")

    def _write(self, rows, mode):
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._keys)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)
