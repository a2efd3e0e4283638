"""benchmarks/reference_jax.py computes what MTPCausalLM(GPT2Backbone) does.

Same weights, same batch: the same parameter count, losses (total,
main, per depth) and, after one Adam step, the same weights as `model.fit`.
"""

import importlib.util
import os

import keras
import keras_hub
import numpy as np
import pytest

import keras_mtp

if keras.config.backend() != "jax":
    pytest.skip("the reference is written in JAX", allow_module_level=True)

import jax  # noqa: E402
import optax  # noqa: E402

_PATH = os.path.join(
    os.path.dirname(__file__), "..", "benchmarks", "reference_jax.py"
)
_SPEC = importlib.util.spec_from_file_location("reference_jax", _PATH)
ref = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ref)

V, L, H, D_MODEL, F, T, B, DEPTHS, LAMBDA = 64, 2, 2, 32, 64, 16, 4, 2, 0.3
LEARNING_RATE = 1e-3


def _model():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=V,
        num_layers=L,
        num_heads=H,
        hidden_dim=D_MODEL,
        intermediate_dim=F,
        max_sequence_length=T,
        dropout=0.0,
    )
    model = keras_mtp.MTPCausalLM(
        backbone, mtp_num_layers=DEPTHS, mtp_loss_scaling_factor=LAMBDA
    )
    # Random weights with norm scales away from 1 and biases away from 0, so
    # a convention mismatch (which norm, which bias, which order) shows.
    rng = np.random.default_rng(1)
    for v in model.trainable_weights:
        noise = 0.2 * rng.normal(size=v.shape).astype("float32")
        is_scale = v.path.endswith(("/gamma", "/scale"))
        v.assign(1.0 + noise if is_scale else noise)
    return model


def _batch():
    """Right-padded rows as keras-hub's CausalLMPreprocessor makes them."""
    rng = np.random.default_rng(2)
    rows = rng.integers(1, V, size=(B, T + 1)).astype("int32")
    mask = np.ones((B, T + 1), "int32")
    mask[1, -4:] = 0
    mask[3, -9:] = 0
    rows[mask == 0] = 0
    x = {"token_ids": rows[:, :-1], "padding_mask": mask[:, :-1]}
    return x, rows[:, 1:], mask[:, 1:].astype("float32")


@pytest.fixture(scope="module")
def run():
    """One `model.fit` step and one reference step from the same weights."""
    model = _model()
    x, y, w = _batch()
    params = ref.params_from_keras(model)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE))
    history = model.fit(
        x, y, sample_weight=w, batch_size=B, epochs=1, shuffle=False, verbose=0
    )
    config = ref.config_from_keras(model)
    # Keras' ε (1e-7) goes on √v, optax's on √v̂: the same first step needs
    # ε / √(1 - β₂). With eps=1e-7 itself the weights differ by up to 7e-4.
    optimizer = optax.adam(LEARNING_RATE, eps=ref.keras_adam_eps(1e-7))
    train_step = ref.make_train_step(config, optimizer)
    batch = ref.make_batch(x, y, w)
    new_params, _, metrics = train_step(params, optimizer.init(params), batch)
    return {
        "model": model,
        "config": config,
        "batch": batch,
        "params": params,
        "logs": {k: v[0] for k, v in history.history.items()},
        "new_params": new_params,
        "keras_new_params": ref.params_from_keras(model),
        "metrics": jax.tree.map(np.asarray, metrics),
    }


def test_parameter_count_and_layout(run):
    model, params = run["model"], run["params"]
    # λ and the sown per-depth losses and accuracies are not parameters.
    sown = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)
    assert ref.count_params(params) == model.count_params() - sown == 41152
    fresh = ref.init_params(jax.random.key(0), run["config"])
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert jax.tree.map(lambda a: a.shape, fresh) == shapes


def test_config_from_keras(run):
    config = run["config"]
    assert config.mtp_num_layers == DEPTHS
    assert config.mtp_loss_scaling_factor == pytest.approx(LAMBDA)
    # GPT2Backbone has no `layer_norm_epsilon`: the MTP RMSNorms use 1e-6.
    assert (config.layer_norm_epsilon, config.rms_norm_epsilon) == (1e-5, 1e-6)


def test_losses_match_keras_training_loss(run):
    logs, metrics = run["logs"], run["metrics"]
    np.testing.assert_allclose(metrics["loss"], logs["loss"], atol=1e-5)
    np.testing.assert_allclose(
        metrics["main_loss"], logs["main_loss"], atol=1e-5
    )
    np.testing.assert_allclose(metrics["mtp_loss"], logs["mtp_loss"], atol=1e-5)
    np.testing.assert_allclose(
        metrics["accuracy"], logs["sparse_categorical_accuracy"], atol=1e-6
    )
    for k in range(DEPTHS):
        np.testing.assert_allclose(
            metrics["mtp_losses"][k], logs[f"mtp_loss_{k + 1}"], atol=1e-5
        )
        np.testing.assert_allclose(
            metrics["mtp_accuracies"][k],
            logs[f"mtp_accuracy_{k + 1}"],
            atol=1e-6,
        )
    # And the objective itself: total = main + λ · mean of the depths.
    np.testing.assert_allclose(
        metrics["loss"],
        metrics["main_loss"] + LAMBDA * np.mean(metrics["mtp_losses"]),
        rtol=1e-6,
    )


def test_one_adam_step_matches_fit(run):
    ours, theirs = run["new_params"], run["keras_new_params"]
    moved = jax.tree.map(
        lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
        ours,
        run["params"],
    )
    # Adam's first step moves nearly every weight by about the learning rate.
    assert max(jax.tree.leaves(moved)) > 0.5 * LEARNING_RATE
    diffs = jax.tree.map(
        lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
        ours,
        theirs,
    )
    assert max(jax.tree.leaves(diffs)) < 1e-5, diffs


def test_mtp_weights_match_keras_mtp_ops():
    rng = np.random.default_rng(3)
    ids = rng.integers(1, V, size=(B, T)).astype("int32")
    mask = (rng.random((B, T)) > 0.2).astype("int32")
    segments = np.sort(rng.integers(0, 3, size=(B, T)), axis=1)
    for k in (1, 2, 3):
        for seg in (None, segments):
            want = keras_mtp.ops.mtp_targets_and_weights(ids, mask, k, seg)
            got = ref.mtp_targets_and_weights(
                ids, mask, k, None if seg is None else segments
            )
            for a, b in zip(got, want):
                np.testing.assert_array_equal(
                    np.asarray(a), keras.ops.convert_to_numpy(b)
                )
