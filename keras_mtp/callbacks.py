"""Keras callbacks and schedules for MTP training.

- `global_step(model)`: the training steps taken, from the optimizer.
- Schedules: `warmup_cosine` (the learning rate of train.py and the
  notebooks) and `deepseek_v3_schedule` (the MTP loss weight λ of
  DeepSeek-V3, for `MTPLossScheduler`).
- Callbacks: `MTPLossScheduler`, `Throughput`, `TrainingLossLog`,
  `MetricsCSV`, `StopAtStep` and `SynchronousEvaluation`.
"""

import csv
import os
import time

import keras

from keras_mtp import flops
from keras_mtp.validation import check_float
from keras_mtp.validation import check_int
from keras_mtp.validation import check_loss_scaling_factor


def global_step(model_or_optimizer):
    """The training steps taken so far, as a Python int.

    Read from the optimizer's `iterations` (saved and restored with its
    state, so a resumed run continues counting). Reading it waits for the
    steps dispatched so far (JAX and TensorFlow run asynchronously).

    Args:
        model_or_optimizer: a compiled `keras.Model` or a
            `keras.optimizers.Optimizer`.
    """
    optimizer = getattr(model_or_optimizer, "optimizer", model_or_optimizer)
    if optimizer is None or not hasattr(optimizer, "iterations"):
        raise ValueError(
            "`global_step` needs a compiled model or an optimizer. Received: "
            f"{model_or_optimizer!r}"
        )
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


def warmup_cosine(
    learning_rate, steps, warmup_steps=0, min_learning_rate_ratio=0.1
):
    """Linear warmup from 0 to `learning_rate`, then cosine decay to
    `min_learning_rate_ratio · learning_rate` at step `steps`.

    A `keras.optimizers.schedules.CosineDecay`. The warmup takes at most
    `steps - 1` steps; with none, the decay starts at the peak.

    Args:
        learning_rate: float > 0. The peak learning rate.
        steps: int >= 1. The training steps: the decay ends at this step.
        warmup_steps: int >= 0. Steps of the linear warmup.
        min_learning_rate_ratio: float in [0, 1]. The final fraction of
            the peak.

    Example:

    ```python
    model.compile(optimizer=keras.optimizers.Adam(
        keras_mtp.callbacks.warmup_cosine(3e-3, steps=1200, warmup_steps=30)))
    ```
    """
    learning_rate = check_float(learning_rate, "learning_rate")
    if learning_rate == 0:
        raise ValueError(
            "`learning_rate` must be > 0. Received: learning_rate=0.0"
        )
    steps = check_int(steps, "steps", minimum=1)
    warmup = min(check_int(warmup_steps, "warmup_steps"), steps - 1)
    ratio = check_float(
        min_learning_rate_ratio, "min_learning_rate_ratio", maximum=1.0
    )
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else learning_rate,
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
        decay_steps=steps - warmup,
        alpha=ratio,
    )


def deepseek_v3_schedule(switch_step, before=0.3, after=0.1):
    """DeepSeek-V3's MTP loss weight: `λ = 0.3` for the steps before
    `switch_step`, then `0.1` (the paper switches after the first 10T of
    14.8T tokens). A schedule for `MTPLossScheduler`.

    Args:
        switch_step: number >= 0 (a float too: `0.7 * steps`). The first
            step of `after`.
        before: float >= 0. λ before the switch.
        after: float >= 0. λ from the switch on.

    Example:

    ```python
    scheduler = keras_mtp.callbacks.MTPLossScheduler(
        keras_mtp.callbacks.deepseek_v3_schedule(0.7 * steps))
    ```
    """
    switch_step = check_float(switch_step, "switch_step")
    check_loss_scaling_factor(before)
    check_loss_scaling_factor(after)

    def schedule(step):
        return before if step < switch_step else after

    return schedule


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
            self._epoch_start_step = global_step(self.model) - batch
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
            global_step(self.model)
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
        self._epoch_start = global_step(self.model)
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


class MetricsCSV(keras.callbacks.CSVLogger):
    """`CSVLogger` whose `mfu` column reads "n/a" where the device's peak
    FLOP/s is unknown (`Throughput` then leaves `mfu` out of the logs)."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, {"mfu": "n/a", **(logs or {})})


class StopAtStep(keras.callbacks.Callback):
    """Ends training after exactly `steps` steps: the last evaluation
    interval is cut short when `steps_per_epoch` does not divide `steps`
    (it is still evaluated, logged and checkpointed).

    Args:
        steps: int >= 1. The total training steps (epochs from 0).
        steps_per_epoch: int >= 1. `model.fit`'s `steps_per_epoch`.
    """

    def __init__(self, steps, steps_per_epoch):
        super().__init__()
        self.steps = check_int(steps, "steps", minimum=1)
        self.steps_per_epoch = check_int(
            steps_per_epoch, "steps_per_epoch", minimum=1
        )
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch * self.steps_per_epoch + batch + 1 >= self.steps:
            self.model.stop_training = True


class SynchronousEvaluation(keras.callbacks.Callback):
    """Keeps Keras from reading evaluation logs on a background thread.

    With several processes, reading a global array is a computation every
    process must run in the same order; Keras' asynchronous callback thread
    can interleave its reads differently with the main thread's in each
    process (two processes on gloo deadlocked in `evaluate`). A callback
    that defines `on_test_batch_end` turns that thread off. (Training is
    synchronous already where a callback defines `on_train_batch_end`, as
    `StopAtStep` does.)
    """

    def on_test_batch_end(self, batch, logs=None):
        pass
