"""keras_mtp.checkpoint for a notebook user's `model.fit`, without train.py.

Training interrupted mid-epoch and resumed with `ResumableCheckpoint` ends
with the weights, optimizer state and step of the uninterrupted run; a
corrupt newest checkpoint is set aside and the one before it used; a
checkpoint of another model is an error, never a silent restart.

Orbax writes the same checkpoints on every backend; JAX is the one tested
(one backend leg is enough, as for train.py's checkpoints).
"""

import os

import keras
import numpy as np
import pytest
from conftest import make_backbone
from conftest import make_batch

import keras_mtp
from keras_mtp import checkpoint
from keras_mtp.callbacks import global_step

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="Orbax checkpoints: tested on the JAX backend",
)

# 12 rows in batches of 4: 3 steps per epoch, 4 epochs, 12 steps in all.
BATCH_SIZE = 4
EPOCHS = 4
STEPS = 12


def build(mtp_num_layers=2, seed=0):
    """The notebook's model, compiled: the tiny Llama of conftest."""
    keras.utils.clear_session()  # the same variable paths every time
    model = keras_mtp.MTPCausalLM(
        make_backbone("llama", seed=seed), mtp_num_layers=mtp_num_layers
    )
    schedule = keras_mtp.callbacks.warmup_cosine(1e-2, STEPS, warmup_steps=2)
    model.compile(optimizer=keras.optimizers.Adam(schedule))
    return model


def fit(model, directory, *extra_callbacks, resumable=None):
    """The notebook's `fit` cell: the same every time it is rerun."""
    x, y, w = make_batch(batch=3 * BATCH_SIZE)
    resumable = resumable or checkpoint.ResumableCheckpoint(directory)
    history = model.fit(
        x,
        y,
        sample_weight=w,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        shuffle=False,  # each epoch sees the same batches
        callbacks=[*extra_callbacks, resumable],
        verbose=0,
    )
    return history, resumable


class Interrupt(keras.callbacks.Callback):
    """Raises before global step `step`, as a kill would stop the run."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_begin(self, batch, logs=None):
        if global_step(self.model) == self.step:
            raise KeyboardInterrupt(f"interrupted at step {self.step}")


def state(model):
    """Every variable the optimizer and the model hold, by path."""
    variables = model.weights + model.optimizer.variables
    return {v.path: keras.ops.convert_to_numpy(v) for v in variables}


def assert_same_state(model, reference):
    got, want = state(model), state(reference)
    assert got.keys() == want.keys()
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, atol=1e-6, err_msg=path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run nobody interrupted, and its checkpoints' directory."""
    directory = str(tmp_path_factory.mktemp("run") / "checkpoints")
    model = build()
    history, resumable = fit(model, directory)
    assert resumable.restored is None
    assert len(history.history["loss"]) == EPOCHS
    assert global_step(model) == STEPS
    return model, directory


def test_fit_interrupted_mid_epoch_resumes_to_the_same_state(
    tmp_path, uninterrupted
):
    reference, _ = uninterrupted
    directory = str(tmp_path / "checkpoints")
    # Step 7 is in epoch 2 (steps 6-8): epochs 0 and 1 are checkpointed.
    model = build()
    interrupted = checkpoint.ResumableCheckpoint(directory)
    with pytest.raises(KeyboardInterrupt):
        fit(model, directory, Interrupt(step=7), resumable=interrupted)
    assert global_step(model) == 7
    # The process ends here, once its background write has finished.
    interrupted.wait_until_finished()
    assert checkpoint.complete_checkpoints(directory) == [1, 0]

    # Rerun the notebook: a new model (other initial weights), same fit.
    model = build(seed=1)
    history, resumable = fit(model, directory)
    assert resumable.restored == 1
    assert len(history.history["loss"]) == EPOCHS - 2  # epochs 2 and 3
    assert global_step(model) == STEPS
    assert_same_state(model, reference)
    # A later fit on the same model starts at the epoch it asks for.
    assert model._initial_epoch is None


def test_rerun_after_the_last_epoch_trains_nothing(uninterrupted, tmp_path):
    reference, directory = uninterrupted
    model = build(seed=1)
    history, resumable = fit(model, directory)
    assert resumable.restored == EPOCHS - 1
    assert history.history == {}
    assert global_step(model) == STEPS
    assert_same_state(model, reference)


def corrupt(path):
    """Overwrites every file below `path` (a checkpoint)."""
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "w") as f:
                f.write("corrupt")


def test_corrupt_checkpoint_is_set_aside_and_the_one_before_used(
    tmp_path, capsys, uninterrupted
):
    reference, _ = uninterrupted
    directory = str(tmp_path / "checkpoints")
    model = build()
    interrupted = checkpoint.ResumableCheckpoint(directory)
    with pytest.raises(KeyboardInterrupt):  # epochs 0-2 written
        fit(model, directory, Interrupt(step=10), resumable=interrupted)
    interrupted.wait_until_finished()
    # Keeps the newest two: 2 and 1. The newest is corrupt.
    assert checkpoint.complete_checkpoints(directory) == [2, 1]
    corrupt(os.path.join(directory, "2"))

    model = build(seed=1)
    history, resumable = fit(model, directory)
    assert resumable.restored == 1
    assert len(history.history["loss"]) == 2  # epochs 2 and 3 again
    assert global_step(model) == STEPS
    err = capsys.readouterr().err
    assert "Cannot restore " + os.path.join(directory, "2") in err
    aside = directory + ".corrupt"
    assert f"Moved {directory}/2 to {aside}/2" in err
    assert os.listdir(aside) == ["2"]
    # Training went on and wrote epochs 2 and 3 anew.
    assert checkpoint.complete_checkpoints(directory) == [3, 2]
    assert_same_state(model, reference)


def test_checkpoint_of_another_model_is_an_error(uninterrupted):
    _, directory = uninterrupted
    before = checkpoint.complete_checkpoints(directory)
    other = build(mtp_num_layers=1)  # 1 MTP depth, not 2
    with pytest.raises(ValueError, match="No checkpoint in .* can be restored"):
        fit(other, directory)
    # Nothing moved, nothing trained.
    assert checkpoint.complete_checkpoints(directory) == before
    assert not os.path.exists(directory + ".corrupt")
    assert global_step(other) == 0


def test_resumable_checkpoint_arguments(tmp_path):
    with pytest.raises(ValueError, match="`directory` must be"):
        checkpoint.ResumableCheckpoint("")
    with pytest.raises(ValueError, match="max_to_keep=0"):
        checkpoint.ResumableCheckpoint(str(tmp_path), max_to_keep=0)
    resumable = checkpoint.ResumableCheckpoint(tmp_path / "relative")
    assert resumable.directory == str(tmp_path / "relative")
    assert resumable.save_freq == "epoch"
