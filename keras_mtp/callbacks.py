"""Keras callbacks for MTP training."""

import keras

from keras_mtp.mtp_block import check_loss_scaling_factor


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
