"""Strict Orbax checkpoints: resume `model.fit` where it stopped.

`restore_checkpoint(model, directory)` loads the newest checkpoint of a
`keras.callbacks.OrbaxCheckpoint` directory that fits `model` exactly
(weights, non-trainable variables and the optimizer state, its step
included), resharded onto the current devices; a corrupt one is reported,
the one before it used and the corrupt one moved aside. Keras 3.15's own
`OrbaxCheckpoint` loading reads only the newest checkpoint and skips
variables whose paths do not match.

`ResumableCheckpoint` is the callback for `model.fit`: it saves an Orbax
checkpoint at the end of every epoch and, when `fit` begins, restores the
newest one and continues from the epoch after it, as
`keras.callbacks.BackupAndRestore` does. Rerun the same cell (or script)
after an interruption and training goes on:

```python
checkpoint = keras_mtp.checkpoint.ResumableCheckpoint("run/checkpoints")
model.fit(x, y, epochs=10, callbacks=[checkpoint])
```
"""

import os
import sys

import keras
import numpy as np

from keras_mtp.validation import check_int


def complete_checkpoints(directory):
    """The numbers (epochs) of the complete checkpoints, newest first.

    Orbax writes a checkpoint under a temporary name and renames it to its
    number once every process has written its shards, so one killed
    mid-write is never listed.
    """
    if not os.path.isdir(directory):
        return []
    names = os.listdir(directory)
    return sorted((int(name) for name in names if name.isdigit()), reverse=True)


def _flatten(tree, prefix=""):
    """`{"a": {"b": x}}` -> `{"a/b": x}`: variable paths to values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def _abstract_state(path, state):
    """JAX: the checkpoint's arrays as `jax.ShapeDtypeStruct`s placed like
    the model's variables (`state`), so that Orbax reshards them onto the
    current devices whatever the writers' topology; the rest (metrics not
    built yet) replicated. Other backends: None (Orbax reads numpy)."""
    if keras.config.backend() != "jax":
        return None
    import jax
    from orbax.checkpoint import v1 as ocp

    distribution = keras.distribution.distribution()
    if distribution is None:
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        mesh = distribution.device_mesh.backend_mesh
        default = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def abstract(meta, ref):
        if isinstance(meta, dict):
            ref = ref if isinstance(ref, dict) else {}
            return {k: abstract(v, ref.get(k)) for k, v in meta.items()}
        sharding = getattr(ref, "sharding", None) or default
        return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)

    metadata = ocp.pytree_metadata(path, checkpointable_name="pytree")
    return abstract(metadata.metadata, state)


def load_checkpoint(model, path):
    """`model.load_weights` for one Orbax checkpoint `path`, strictly.

    Keras 3.15's takes the checkpoints' directory and only reads the newest
    one, and it skips variables whose paths do not match; here every
    weight, non-trainable variable and optimizer variable of `model` must
    be in the checkpoint with its shape, and nothing else.
    """
    from orbax.checkpoint import v1 as ocp

    state = model.get_state_tree()
    target = _abstract_state(path, state)
    loaded = ocp.load_checkpointables(path, {"pytree": target})["pytree"]
    keys = ("trainable_variables", "non_trainable_variables")
    keys += ("optimizer_variables",)
    for key in keys:
        want, have = _flatten(state.get(key, {})), _flatten(loaded.get(key, {}))
        if want.keys() != have.keys():
            raise ValueError(
                f"{path} holds other {key} than the model: missing "
                f"{sorted(want.keys() - have.keys())[:3]}, unexpected "
                f"{sorted(have.keys() - want.keys())[:3]}"
            )
        for name, value in want.items():
            if tuple(value.shape) != tuple(np.shape(have[name])):
                raise ValueError(
                    f"{path}: {name} has shape {np.shape(have[name])}, the "
                    f"model's has {tuple(value.shape)}"
                )
    model.set_state_tree({key: loaded[key] for key in keys if key in loaded})


def restore_checkpoint(model, directory):
    """Loads the newest checkpoint of `directory` that loads into `model`:
    weights, optimizer state (its step included) and λ, resharded onto the
    current distribution. One that fails to load (corrupt) is reported and
    the one before it tried; once one loads, those that failed are moved
    aside (`set_aside`), since Orbax refuses to write their numbers again.
    If none loads, a `ValueError` says why, never a silent restart from
    step 0, and nothing is moved. Returns the checkpoint's number or None.
    """
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    failures = []
    for number in complete_checkpoints(directory):
        path = os.path.join(directory, str(number))
        try:
            load_checkpoint(model, path)
        except Exception as e:  # corrupt, truncated or foreign files
            failures.append((path, f"{path}: {type(e).__name__}: {e}"))
            print(f"Cannot restore {failures[-1][1]}", file=sys.stderr)
            continue
        for failed, _ in failures:
            set_aside(failed, directory)
        return number
    if failures:
        raise ValueError(
            f"No checkpoint in {directory} can be restored, so the run "
            "cannot resume; move the directory away to start afresh.\n"
            + "\n".join(message for _, message in failures)
        )
    return None


def set_aside(path, directory):
    """Moves the checkpoint `path` of `directory` to `<directory>.corrupt/`
    (its number, then `-1`, `-2`, ... if taken) and says where: kept for
    inspection, never deleted or written over. Process 0 moves it, before
    its first training step; the other processes cannot finish that step
    (a collective) without it, so none saves a checkpoint before the move.
    """
    if keras.config.backend() == "jax":
        import jax

        if jax.process_index() > 0:
            return
    aside = directory + ".corrupt"
    os.makedirs(aside, exist_ok=True)
    name = os.path.basename(path)
    target, n = os.path.join(aside, name), 0
    while os.path.lexists(target):
        n += 1
        target = os.path.join(aside, f"{name}-{n}")
    os.rename(path, target)
    print(
        f"Moved {path} to {target} (kept for inspection; training goes on "
        "from the checkpoint before it)",
        file=sys.stderr,
    )


class ResumableCheckpoint(keras.callbacks.OrbaxCheckpoint):
    """Saves an Orbax checkpoint every epoch; `fit` resumes from the newest.

    A `keras.callbacks.OrbaxCheckpoint` (asynchronous, sharded: every
    process writes its shards; the newest `max_to_keep` are kept) whose
    `on_train_begin` restores, as `keras.callbacks.BackupAndRestore` does:
    the newest checkpoint that loads into the model (`restore_checkpoint`:
    weights, optimizer state and step, the MTP loss weight λ; a corrupt one
    is moved aside and the one before it used; a checkpoint of another
    model is a `ValueError`, never a silent restart), and `fit` goes on
    from the epoch after it. The checkpoints are numbered by epoch, so
    train with the same `epochs`, `steps_per_epoch` and data as the
    interrupted run: feed data that gives each epoch the same batches
    (arrays with `shuffle=False`, or a dataset that starts at the restored
    step, `keras_mtp.data.make_dataset(..., start_step=...)`).

    Put it last in the callback list so an epoch's checkpoint is written
    after its logs; the callbacks before it then see, in their own
    `on_train_begin`, the step before the restore (keras_mtp's
    `MTPLossScheduler` reads the step at the first batch instead).

    Args:
        directory: str. The checkpoints' directory (one per run).
        max_to_keep: int >= 1. The newest checkpoints kept.
        save_on_background: bool. Write asynchronously (training goes on).

    Example:

    ```python
    checkpoint = keras_mtp.checkpoint.ResumableCheckpoint("run/checkpoints")
    model.fit(x, y, epochs=10, shuffle=False, callbacks=[checkpoint])
    # Interrupted? Build and compile the model again, rerun the same fit:
    # it restores the newest checkpoint and trains the remaining epochs.
    ```
    """

    def __init__(self, directory, max_to_keep=2, save_on_background=True):
        if not isinstance(directory, (str, os.PathLike)) or not directory:
            raise ValueError(
                "`directory` must be a non-empty path (str). Received: "
                f"{directory!r}"
            )
        super().__init__(
            os.path.abspath(os.fspath(directory)),
            save_freq="epoch",
            max_to_keep=check_int(max_to_keep, "max_to_keep", minimum=1),
            save_on_background=save_on_background,
        )
        self.restored = None  # the checkpoint number restored by fit

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if not self.model.built:
            raise ValueError(
                "ResumableCheckpoint restores into the model's variables: "
                "build the model before `fit` (call it on a batch). "
                f"Received: an unbuilt {type(self.model).__name__}"
            )
        self.restored = restore_checkpoint(self.model, self.directory)
        # Orbax lists the steps when the callback is made; one set aside
        # since is written again.
        self.checkpointer.reload()
        if self.restored is not None:
            # Read by `fit` right after `on_train_begin`.
            self.model._initial_epoch = self.restored + 1

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self.model._initial_epoch = None  # a later `fit` starts as asked
