"""Training the MTP heads alone on a frozen pretrained trunk, fast.

With the trunk frozen, its final hidden states `h^0` do not change during
training: `fit_heads` computes them once per row of data (with the main
head's top-1 ids, for the acceptance metric), keeps them in memory, and
trains only the MTP depths on them for as many steps as asked. A step then
costs the depths alone (block, projection, head), not the 30-layer trunk;
the loss and gradients are those of `MTPCausalLM.fit` with
`backbone.trainable = False` on the same batch.

Optionally (`self_distill=True`, as Medusa-2 and EAGLE train their
drafters) the rows are first replaced by the model's own greedy
continuations of their beginnings, so the heads learn the text they will
be judged on when decoding.

```python
model = keras_mtp.MTPCausalLM.from_preset(dir, mtp_num_layers=1)
history = keras_mtp.heads.fit_heads(model, texts, steps=500)
model.save_to_preset("./with_heads")
```
"""

import time
import weakref

import keras
import numpy as np
from keras import ops

from keras_mtp import backbones
from keras_mtp import ops as mtp_ops
from keras_mtp.validation import check_int
from keras_mtp.validation import check_mtp_targets


def fit_heads(
    model,
    data,
    *,
    steps,
    batch_size=8,
    sequence_length=256,
    learning_rate=1e-3,
    mtp_targets="main",
    self_distill=False,
    prompt_length=32,
    max_rows=None,
    seed=0,
    callbacks=None,
    verbose="auto",
):
    """Trains the MTP depths of `model` on its frozen trunk's cached features.

    Args:
        model: an `MTPCausalLM` with `mtp_num_layers >= 1`.
        data: a list of strings (tokenized with `model.preprocessor`'s
            tokenizer, joined with its end token and cut into rows of
            `sequence_length` tokens) or an int array `(N, sequence_length)`
            of token ids (every position real).
        steps: int >= 1. Optimizer steps over the cached rows (random
            batches, drawn with `seed`).
        batch_size: int >= 1. Rows per step (and per feature batch).
        sequence_length: int > `mtp_num_layers + 1`. Tokens per row.
        learning_rate: float > 0. Adam's learning rate.
        mtp_targets: `"main"` (learn the main head's distribution, what
            greedy speculation accepts) or `"labels"` (the data's next
            tokens). Set on the model (`model.mtp_targets`), so a saved
            preset records it.
        self_distill: bool. If True, each row becomes its first
            `prompt_length` tokens followed by the model's own greedy
            continuation (generated in batches of `batch_size`).
        prompt_length: int >= 1, < `sequence_length`. See `self_distill`.
        max_rows: int or None. Use at most this many rows of `data`.
        seed: int. The order of the training batches.
        callbacks: Keras callbacks for the training `fit` (e.g. one that
            stops it after a time budget).
        verbose: `fit`'s verbosity.

    Returns:
        The `keras.callbacks.History` of the training: `loss` (`λ·L_mtp`,
        the part of `MTPCausalLM`'s loss that reaches the depths),
        `mtp_loss`, `mtp_loss_k` and `mtp_acceptance_k` per depth. The
        history's `features_seconds` and `tokens` attributes give the time
        spent preparing (generating and caching) and the number of tokens
        cached. `model.backbone.trainable` is left as it was.
    """
    depths = getattr(model, "mtp_num_layers", 0)
    if getattr(model, "mtp_block", None) is None:
        raise ValueError(
            "fit_heads() trains the MTP depths of an `MTPCausalLM` with "
            f"mtp_num_layers >= 1. Received: {type(model).__name__} with "
            f"mtp_num_layers={depths}"
        )
    steps = check_int(steps, "steps", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    sequence_length = check_int(
        sequence_length, "sequence_length", minimum=depths + 2
    )
    prompt_length = check_int(prompt_length, "prompt_length", minimum=1)
    if self_distill and prompt_length >= sequence_length:
        raise ValueError(
            "`prompt_length` must be shorter than `sequence_length` to leave "
            f"room for a continuation. Received: prompt_length="
            f"{prompt_length}, sequence_length={sequence_length}"
        )
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(
            f"`learning_rate` must be a number > 0. Received: "
            f"learning_rate={learning_rate!r}"
        )
    check_mtp_targets(mtp_targets)
    if max_rows is not None:
        max_rows = check_int(max_rows, "max_rows", minimum=1)

    start = time.perf_counter()
    rows = token_rows(model, data, sequence_length, max_rows)
    if self_distill:
        rows = self_distilled_rows(model, rows, prompt_length, batch_size)
    features = cache_features(model, rows, batch_size)
    prepared = time.perf_counter() - start

    model.mtp_targets = mtp_targets
    model.mtp_block.mtp_targets = mtp_targets
    trainer = HeadsTrainer(model.mtp_block)
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate))
    trainable = model.backbone.trainable
    model.backbone.trainable = False  # the shared embedding and head too
    try:
        history = trainer.fit(
            _batches(features, batch_size, seed),
            steps_per_epoch=steps,
            epochs=1,
            callbacks=callbacks,
            shuffle=False,  # the batches are drawn at random
            verbose=verbose,
        )
    finally:
        model.backbone.trainable = trainable
    history.features_seconds = prepared
    history.tokens = int(rows.size)
    return history


def token_rows(model, data, sequence_length, max_rows=None):
    """`data` as an int32 array `(N, sequence_length)` of token ids (see
    `fit_heads`), at most `max_rows` rows (texts are tokenized only as far
    as needed)."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, (list, tuple)) and all(
        isinstance(t, str) for t in data
    ):
        if model.preprocessor is None:
            raise ValueError(
                "fit_heads() received text but the model has no "
                "`preprocessor`; pass token ids `(N, sequence_length)`."
            )
        tokenizer = model.preprocessor.tokenizer
        end = getattr(tokenizer, "end_token_id", None)
        ids = []
        for text in data:
            ids.extend(np.asarray(tokenizer(text)).tolist())
            if end is not None:
                ids.append(end)
            if max_rows is not None and len(ids) >= max_rows * sequence_length:
                break
        count = len(ids) // sequence_length
        if count == 0:
            raise ValueError(
                f"fit_heads() needs at least {sequence_length} tokens of "
                f"text (sequence_length); the texts have {len(ids)}."
            )
        if max_rows is not None:
            count = min(count, max_rows)
        ids = np.asarray(ids[: count * sequence_length], "int32")
        return ids.reshape(count, sequence_length)
    rows = np.asarray(data)
    vocabulary = model.backbone.vocabulary_size
    if (
        rows.ndim != 2
        or rows.shape[1] != sequence_length
        or not np.issubdtype(rows.dtype, np.integer)
        or len(rows) == 0
    ):
        raise ValueError(
            "fit_heads() takes a list of strings or an int array (N, "
            f"sequence_length={sequence_length}) of token ids. Received: "
            f"{type(data).__name__} of shape {rows.shape}, dtype {rows.dtype}"
        )
    if rows.min() < 0 or rows.max() >= vocabulary:
        raise ValueError(
            f"Token ids must lie in [0, {vocabulary}). Received ids in "
            f"[{rows.min()}, {rows.max()}]"
        )
    return rows[:max_rows].astype("int32")


def self_distilled_rows(model, rows, prompt_length, batch_size):
    """Each row's first `prompt_length` tokens and the model's own greedy
    continuation of them, to the row's length (no speculation, no stop)."""
    length = rows.shape[1]
    out = []
    for begin in range(0, len(rows), batch_size):
        prompts = np.zeros_like(rows[begin : begin + batch_size])
        prompts[:, :prompt_length] = rows[
            begin : begin + batch_size, :prompt_length
        ]
        mask = np.zeros_like(prompts)
        mask[:, :prompt_length] = 1
        generated = model.generate(
            {"token_ids": prompts, "padding_mask": mask},
            max_length=length,
            stop_token_ids=None,
            speculative=False,
            sampler="greedy",
        )
        out.append(np.asarray(generated["token_ids"], "int32"))
    return np.concatenate(out)


class _Features(keras.Model):
    """The frozen trunk's `h^0 (B, T, d)` and the main head's top-1 ids."""

    def __init__(self, model, **kwargs):
        # Named explicitly: the class name's default, "__features", is not
        # a valid TensorFlow name scope.
        kwargs.setdefault("name", "trunk_features")
        super().__init__(**kwargs)
        self.causal_lm = model

    def call(self, token_ids):
        backbone = self.causal_lm.backbone
        mask = ops.ones_like(token_ids)
        hidden = backbone(backbones.backbone_inputs(backbone, token_ids, mask))
        logits = self.causal_lm._logits(hidden)
        return hidden, ops.cast(mtp_ops.top1(logits), "int32")


# One compiled feature function per model (not an attribute: Keras would
# track it as a layer of the model).
_FEATURES = weakref.WeakKeyDictionary()


def cache_features(model, rows, batch_size):
    """A dict of NumPy arrays: `token_ids` `(N, T)`, `hidden_states`
    `(N, T, d)` (the trunk's output, float32) and `main_ids` `(N, T)`,
    computed in batches of `batch_size` rows (the last one padded, so one
    compiled function serves every batch)."""
    if model not in _FEATURES:
        _FEATURES[model] = _Features(model)
    features = _FEATURES[model]
    hidden, main_ids = [], []
    for begin in range(0, len(rows), batch_size):
        batch = rows[begin : begin + batch_size]
        size = len(batch)
        if size < batch_size:
            batch = np.concatenate(
                [
                    batch,
                    np.zeros((batch_size - size,) + batch.shape[1:], "int32"),
                ]
            )
        h, ids = features.predict_on_batch(batch)
        hidden.append(np.asarray(h, "float32")[:size])
        main_ids.append(np.asarray(ids, "int32")[:size])
    return {
        "token_ids": rows,
        "hidden_states": np.concatenate(hidden),
        "main_ids": np.concatenate(main_ids),
    }


def _batches(features, batch_size, seed):
    """Endless batches of `batch_size` cached rows drawn at random."""
    rng = np.random.default_rng(seed)
    count = len(features["token_ids"])
    size = min(batch_size, count)
    while True:
        index = np.sort(rng.choice(count, size=size, replace=False))
        yield ({key: value[index] for key, value in features.items()},)


class HeadsTrainer(keras.Model):
    """Trains an `MTPBlock` on cached trunk features.

    Inputs: a dict of `hidden_states` `(B, T, d)` (the frozen trunk's
    `h^0`), `token_ids` `(B, T)` and `main_ids` `(B, T)` (the main head's
    top-1, for `mtp_acceptance_k`); every position real. The loss is the
    block's `λ·L_mtp`, so gradients equal those `MTPCausalLM.fit` gives the
    depths when its backbone is frozen.
    """

    def __init__(self, block, **kwargs):
        super().__init__(**kwargs)
        self.block = block
        depths = range(1, block.num_layers + 1)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mtp_loss_tracker = keras.metrics.Mean(name="mtp_loss")
        self.depth_loss_trackers = [
            keras.metrics.Mean(name=f"mtp_loss_{k}") for k in depths
        ]
        self.acceptance_trackers = [
            keras.metrics.Mean(name=f"mtp_acceptance_{k}") for k in depths
        ]
        self.built = True  # the block's weights exist already

    def call(self, inputs, training=None):
        token_ids = inputs["token_ids"]
        return self.block(
            inputs["hidden_states"],
            token_ids,
            ops.ones_like(token_ids),
            training=training,
        )

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        losses = ops.cast(y_pred["losses"], "float32")  # (D,)
        tokens = ops.cast(y_pred["tokens"], "float32")
        acceptances = mtp_ops.masked_acceptance(
            y_pred["predictions"], x["main_ids"], y_pred["weights"]
        )
        total = ops.sum(ops.stack([ops.sum(loss) for loss in self.losses]))
        self.loss_tracker.update_state(total)
        self.mtp_loss_tracker.update_state(ops.mean(losses))
        for k in range(len(self.depth_loss_trackers)):
            self.depth_loss_trackers[k].update_state(losses[k])
            self.acceptance_trackers[k].update_state(
                acceptances[k], sample_weight=tokens[k]
            )
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return self.get_metrics_result()

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.mtp_loss_tracker,
            *self.depth_loss_trackers,
            *self.acceptance_trackers,
        ]
