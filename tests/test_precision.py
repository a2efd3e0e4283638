"""Mixed precision on the active backend: under `mixed_bfloat16` the model
computes in bfloat16, keeps float32 weights, and computes its losses and
metrics (main, MTP, per depth) in float32, with or without `loss_chunk_size`.
"""

import keras
import numpy as np
import pytest
from conftest import make_backbone
from conftest import make_batch
from keras import ops

import keras_mtp
from keras_mtp import backbones
from keras_mtp import ops as mtp_ops

DEPTHS = 2
LAMBDA = 0.1  # not a bfloat16 number: bfloat16(0.1) = 0.10009765625
METRICS = {"loss", "main_loss", "mtp_loss", "sparse_categorical_accuracy"}
METRICS |= {f"mtp_loss_{k}" for k in range(1, DEPTHS + 1)}
METRICS |= {f"mtp_accuracy_{k}" for k in range(1, DEPTHS + 1)}
METRICS |= {f"mtp_acceptance_{k}" for k in range(1, DEPTHS + 1)}


def np_(x):
    return ops.convert_to_numpy(x)


def dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def to_bfloat16_and_back(values):
    return np_(ops.cast(ops.cast(values, "bfloat16"), "float32"))


@pytest.fixture
def mixed_bfloat16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)  # float32 for the others


def make_model(loss_chunk_size=None):
    return keras_mtp.MTPCausalLM(
        make_backbone("llama"),
        mtp_num_layers=DEPTHS,
        mtp_loss_scaling_factor=LAMBDA,
        loss_chunk_size=loss_chunk_size,
    )


def fit_and_evaluate(model, epochs=3):
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y, w = make_batch(pad_last=2)
    history = model.fit(x, y, sample_weight=w, epochs=epochs, verbose=0)
    logs = model.evaluate(x, y, sample_weight=w, return_dict=True, verbose=0)
    return history.history, logs


def test_sparse_cross_entropy_of_bfloat16_logits_is_float32_math():
    rng = np.random.default_rng(0)
    logits = ops.cast(rng.normal(size=(4, 6, 50)) * 8, "bfloat16")
    targets = rng.integers(0, 50, size=(4, 6))
    ce = mtp_ops.sparse_cross_entropy(logits, targets)
    assert dtype(ce) == "float32"
    # The exact cross-entropy of the bfloat16 logits: a bfloat16 logsumexp
    # would be off by up to ~1e-1 at these magnitudes.
    z = np_(ops.cast(logits, "float32")).astype("float64")
    expected = (
        np.log(np.exp(z).sum(-1))
        - np.take_along_axis(z, targets[..., None], -1)[..., 0]
    )
    np.testing.assert_allclose(np_(ce), expected, rtol=1e-6, atol=1e-5)
    loss = keras_mtp.SparseCrossEntropy()(targets, logits)
    assert dtype(loss) == "float32"


def test_chunked_cross_entropy_of_bfloat16_is_float32(mixed_bfloat16):
    rng = np.random.default_rng(0)
    hidden = ops.cast(rng.normal(size=(2, 3, 8, 6)), "bfloat16")
    kernel = ops.cast(rng.normal(size=(6, 11)), "bfloat16")
    targets = rng.integers(0, 11, size=(2, 3, 8))
    weights = rng.integers(0, 2, size=(2, 3, 8)).astype("float32")
    losses, accuracies = mtp_ops.chunked_cross_entropy(
        hidden, kernel, targets, weights, 5
    )
    assert dtype(losses) == dtype(accuracies) == "float32"
    # Against float32 math on the same bfloat16 inputs: the chunks' logits
    # are bfloat16, each within a relative 2^-8 of the exact ones, which
    # moves a token's cross-entropy by at most twice that of the largest.
    z = np_(ops.cast(hidden, "float32")) @ np_(ops.cast(kernel, "float32"))
    bound = 2 * 2.0**-8 * np.abs(z).max()
    for g in range(2):
        np.testing.assert_allclose(
            np_(losses[g]),
            np_(mtp_ops.masked_cross_entropy(z[g], targets[g], weights[g])),
            atol=bound,
        )
        # At most one token's argmax may flip between near-tied logits.
        np.testing.assert_allclose(
            np_(accuracies[g]),
            np_(mtp_ops.masked_accuracy(z[g], targets[g], weights[g])),
            atol=1.0 / weights[g].sum() + 1e-6,
        )


@pytest.mark.parametrize("loss_chunk_size", [None, 7])
def test_mixed_bfloat16_fit_keeps_weights_losses_and_metrics_float32(
    mixed_bfloat16, loss_chunk_size
):
    model = make_model(loss_chunk_size)
    # bfloat16 compute, float32 weights: every one of them, MTP's included.
    assert model.compute_dtype == "bfloat16"
    assert model.variable_dtype == "float32"
    for layer in [model.backbone, model.mtp_block, *model.mtp_block.mtp_layers]:
        assert layer.compute_dtype == "bfloat16", layer.name
    assert {v.dtype for v in model.weights} == {"float32"}
    x, y, w = make_batch(pad_last=2)
    assert dtype(model(x)) == "bfloat16"

    # The MTP losses and their add_loss term are float32.
    hidden = model.backbone(x)
    assert dtype(hidden) == "bfloat16"
    outputs = model.mtp_block(hidden, x["token_ids"], x["padding_mask"])
    losses = outputs["losses"]
    assert dtype(losses) == "float32"
    assert [dtype(loss) for loss in model.mtp_block.losses] == ["float32"]
    predictions = outputs.pop("predictions")  # top-1 ids
    assert dtype(predictions) == "int32"
    assert {dtype(v) for v in outputs.values()} == {"float32"}
    # The per-depth losses keep float32 precision: rounded to bfloat16 they
    # would change.
    losses = np_(losses)
    assert np.all(to_bfloat16_and_back(losses) != losses), losses

    history, logs = fit_and_evaluate(model)
    assert set(history) == set(logs) == METRICS
    for key, values in history.items():
        assert np.all(np.isfinite(values)), key
    for key, value in logs.items():
        assert np.isfinite(value), key
    assert history["loss"][-1] < history["loss"][0]  # it trains
    # The total is main + λ · MTP with λ in float32 (bfloat16(λ) would be
    # 1e-3 larger, ~3e-4 on the loss), and mtp_loss the mean of the depths.
    np.testing.assert_allclose(
        logs["loss"], logs["main_loss"] + LAMBDA * logs["mtp_loss"], rtol=1e-6
    )
    depth_mean = np.mean([logs[f"mtp_loss_{k}"] for k in (1, 2)])
    np.testing.assert_allclose(logs["mtp_loss"], depth_mean, rtol=1e-6)
    assert model.mtp_loss_scaling_factor == float(np.float32(LAMBDA))

    # The metrics read by the logs are float32 trackers of float32 values.
    trackers = [
        model.main_loss_tracker,
        model.mtp_loss_tracker,
        *model.mtp_depth_loss_trackers,
        *model.mtp_depth_accuracy_trackers,
        *model.mtp_depth_acceptance_trackers,
    ]
    if loss_chunk_size:
        trackers.append(model.main_accuracy_tracker)
    for tracker in trackers:
        assert tracker.dtype == "float32", tracker.name
        assert {v.dtype for v in tracker.variables} == {"float32"}
        assert dtype(tracker.result()) == "float32", tracker.name
    depth_losses = [logs[f"mtp_loss_{k}"] for k in (1, 2)]
    assert np.all(to_bfloat16_and_back(depth_losses) != depth_losses)
    # Training kept every weight float32.
    assert {v.dtype for v in model.weights} == {"float32"}


def test_mixed_bfloat16_main_loss_is_float32(mixed_bfloat16):
    model = make_model()
    model.compile(optimizer="adam")
    x, y, w = make_batch(pad_last=2)
    loss = model.compute_loss(x=x, y=y, y_pred=model(x), sample_weight=w)
    assert dtype(loss) == "float32"
    # The chunked main loss, from the bfloat16 hidden states: float32.
    embedding = model.backbone.token_embedding
    losses, accuracies = mtp_ops.chunked_cross_entropy(
        model.backbone(x)[None],
        backbones.head_kernel(embedding),
        y[None],
        w[None],
        7,
        head=lambda h, k: backbones.apply_head(embedding, h, k),
    )
    assert dtype(losses) == dtype(accuracies) == "float32"


def test_mixed_bfloat16_chunked_training_matches_dense(mixed_bfloat16):
    # The logits are bfloat16 either way, from matmuls of other shapes (and,
    # for the main head, the float32 kernel in the dense case: Keras'
    # Embedding does not autocast): a logit may round the other way, 2^-8
    # relative, ~1e-4 on a loss. An argmax between near-tied logits may then
    # flip: one token of the >= 34 each head scores here. A wrong target or
    # weight would move both by far more.
    results = [fit_and_evaluate(make_model(chunk)) for chunk in (None, 7)]
    (dense_history, dense_logs), (history, logs) = results
    assert set(history) == set(dense_history) == METRICS
    dense_history = {k: [*v, dense_logs[k]] for k, v in dense_history.items()}
    history = {k: [*v, logs[k]] for k, v in history.items()}
    for key in dense_history:
        if "accuracy" in key or "acceptance" in key:
            np.testing.assert_allclose(
                history[key], dense_history[key], atol=1 / 34, err_msg=key
            )
        else:
            np.testing.assert_allclose(
                history[key], dense_history[key], rtol=1e-3, err_msg=key
            )


def test_policy_is_restored_to_float32():
    # Last in this file: every test above has set and left the policy.
    assert keras.config.dtype_policy().name == "float32"
