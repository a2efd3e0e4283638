"""Heads on a frozen trunk: identity initialization and `fit_heads`."""

import keras
import numpy as np
import pytest
from conftest import VOCAB
from conftest import aux_loss_gradients
from conftest import make_backbone

from keras_mtp import MTPCausalLM
from keras_mtp import backbones
from keras_mtp import heads

# Not yet on torch: the tests read tensors that require grad with NumPy
# (RuntimeError in 23 of 29), and fit_heads on torch is unverified. JAX
# and TensorFlow run them all.
pytestmark = pytest.mark.skipif(
    keras.config.backend() == "torch",
    reason="keras_mtp.heads is tested on JAX and TensorFlow only so far",
)

ROWS, LENGTH = 4, 12


def _rows(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, VOCAB, size=(ROWS, LENGTH)).astype("int32")


def _model(init="identity", depths=2, targets="labels", name="llama"):
    return MTPCausalLM(
        make_backbone(name),
        mtp_num_layers=depths,
        mtp_init=init,
        mtp_targets=targets,
    )


def _rms_normalize(x, epsilon):
    x = x.astype("float64")
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + epsilon)


def test_identity_depth_predicts_what_the_main_head_predicts():
    model = _model()
    rows = _rows()
    mask = np.ones_like(rows)
    hidden = np.asarray(
        model.backbone({"token_ids": rows, "padding_mask": mask}), "float64"
    )  # h^0
    embeddings = np.asarray(model.backbone.token_embedding.embeddings)
    main = hidden @ embeddings.T.astype("float64")  # z^0, (B, T, V)
    layer = model.mtp_block.mtp_layers[0]
    token_embeddings = model.backbone.token_embedding(np.roll(rows, -1, 1))
    _, normed = layer(hidden.astype("float32"), token_embeddings, mask)
    depth = np.asarray(normed, "float64") @ embeddings.T  # z^1
    # NumPy: Norm_1(RMSNorm_h(h^0)) through the head; the embedding of
    # x[i+1] is ignored, so depth 1 at position i (drafting x[i+2]) gives
    # the main head's logits at i divided by a positive per-token factor.
    expected = _rms_normalize(
        _rms_normalize(hidden, layer.hidden_norm.epsilon),
        layer.output_norm.epsilon,
    ) @ embeddings.T.astype("float64")
    np.testing.assert_allclose(depth, expected, rtol=1e-4, atol=1e-5)
    eps_h, eps_o = layer.hidden_norm.epsilon, layer.output_norm.epsilon
    rms = np.sqrt(np.mean(hidden**2, -1, keepdims=True) + eps_h)
    normed_rms = np.sqrt(
        np.mean((hidden / rms) ** 2, -1, keepdims=True) + eps_o
    )
    factor = rms * normed_rms  # (B, T, 1), > 0
    np.testing.assert_allclose(depth * factor, main, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(depth.argmax(-1), main.argmax(-1))


def _identity_block_check(name):
    model = _model(name=name, depths=1)
    layer = model.mtp_block.mtp_layers[0]
    x = np.random.default_rng(1).normal(size=(2, 6, layer.hidden_dim))
    x = x.astype("float32")
    out = backbones.call_decoder(
        layer.transformer_block, x, np.ones((2, 6), "int32")
    )
    np.testing.assert_allclose(np.asarray(out), x, atol=1e-6)
    kernel = np.asarray(layer.projection.kernel)
    d = layer.hidden_dim
    np.testing.assert_array_equal(kernel[:d], 0)
    np.testing.assert_array_equal(kernel[d:], np.eye(d))


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_identity_block_returns_its_input(name):
    _identity_block_check(name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        f.name
        for f in backbones.FAMILIES
        if f.name not in ("llama", "gpt2", "gemma3")
    ],
)
def test_identity_block_returns_its_input_every_family(name):
    _identity_block_check(name)


def test_identity_init_is_saved_in_the_config_and_random_stays():
    model = _model()
    assert model.get_config()["mtp_init"] == "identity"
    assert model.mtp_block.get_config()["mtp_init"] == "identity"
    random = _model(init="random")
    kernel = np.asarray(random.mtp_block.mtp_layers[0].projection.kernel)
    assert np.abs(kernel[: kernel.shape[1]]).sum() > 0
    with pytest.raises(ValueError, match="mtp_init.*'zeros'"):
        _model(init="zeros")


@pytest.mark.parametrize("targets", ["labels", "main"])
def test_cached_features_give_the_frozen_fit_gradients(targets):
    model = _model(init="random", targets=targets)
    model.backbone.trainable = False
    rows = _rows()
    x = {"token_ids": rows, "padding_mask": np.ones_like(rows)}
    expected = aux_loss_gradients(model, x)
    expected_losses = np.asarray(model(x, training=True)["mtp_losses"])

    features = heads.cache_features(model, rows, batch_size=3)
    trainer = heads.HeadsTrainer(model.mtp_block)
    got = aux_loss_gradients(trainer, features)
    assert sorted(got) == sorted(expected)
    assert all(path.startswith("mtp_block/") for path in got)
    for path in expected:
        np.testing.assert_allclose(got[path], expected[path], atol=1e-5)
    losses = np.asarray(trainer(features, training=True)["losses"])
    np.testing.assert_allclose(losses, expected_losses, atol=1e-5)
    main = np.asarray(model.predict(x, verbose=0)).argmax(-1)
    np.testing.assert_array_equal(features["main_ids"], main)


def test_fit_heads_trains_the_depths_alone_and_saves(tmp_path):
    model = _model(targets="labels")
    trunk = [np.array(w) for w in model.backbone.get_weights()]
    depths = [np.array(v) for v in model.mtp_block.mtp_layers[0].weights]
    # A sequence the depths can learn: every row counts up.
    rows = (np.arange(LENGTH)[None] + np.arange(8)[:, None]) % VOCAB
    x = {"token_ids": rows, "padding_mask": np.ones_like(rows)}
    start = model.evaluate(x, rows, return_dict=True, verbose=0)
    history = heads.fit_heads(
        model,
        rows.astype("int32"),
        steps=200,
        batch_size=4,
        sequence_length=LENGTH,
        learning_rate=1e-2,
        mtp_targets="labels",  # a random trunk's main head knows nothing
        verbose=0,
    )
    losses = history.history["mtp_loss"]
    assert set(history.history) >= {
        "loss",
        "mtp_loss_1",
        "mtp_loss_2",
        "mtp_acceptance_1",
        "mtp_acceptance_2",
    }
    assert history.tokens == 8 * LENGTH and history.features_seconds > 0
    assert model.backbone.trainable and model.mtp_targets == "labels"
    for before, after in zip(trunk, model.backbone.get_weights()):
        np.testing.assert_array_equal(before, after)
    changed = [
        not np.array_equal(before, np.asarray(after))
        for before, after in zip(depths, model.mtp_block.mtp_layers[0].weights)
    ]
    assert any(changed) and np.isfinite(losses).all()
    end = model.evaluate(x, rows, return_dict=True, verbose=0)
    assert end["mtp_loss"] < 0.9 * start["mtp_loss"]

    # Saved and loaded by the preset files.
    model.save_to_preset(str(tmp_path))
    loaded = MTPCausalLM.from_preset(str(tmp_path), preprocessor=None)
    assert loaded.mtp_targets == "labels"
    for a, b in zip(model.mtp_block.weights, loaded.mtp_block.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_self_distilled_rows_are_the_models_greedy_continuations():
    model = _model(depths=1)
    rows = _rows()
    out = heads.self_distilled_rows(model, rows, prompt_length=4, batch_size=3)
    np.testing.assert_array_equal(out[:, :4], rows[:, :4])
    # NumPy-side greedy: each generated token is the main head's top-1
    # after the tokens before it.
    for t in range(4, LENGTH):
        logits = model.predict(
            {"token_ids": out[:, :t], "padding_mask": np.ones_like(out[:, :t])},
            verbose=0,
        )
        np.testing.assert_array_equal(out[:, t], logits[:, -1].argmax(-1))


def test_fit_heads_rejects_bad_arguments():
    model = _model(depths=1)
    rows = _rows()
    ok = dict(steps=1, batch_size=2, sequence_length=LENGTH)
    bad = [
        (dict(steps=0), "steps"),
        (dict(batch_size="8"), "batch_size"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(mtp_targets="teacher"), "mtp_targets"),
        (dict(sequence_length=LENGTH + 1), "sequence_length=13"),
        (dict(self_distill=True, prompt_length=LENGTH), "prompt_length"),
        (dict(max_rows=0), "max_rows"),
    ]
    for override, match in bad:
        with pytest.raises(ValueError, match=match):
            heads.fit_heads(model, rows, **{**ok, **override})
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        heads.fit_heads(model, rows + VOCAB, **ok)
    with pytest.raises(ValueError, match="no `preprocessor`"):
        heads.fit_heads(model, ["some text"], **ok)
    plain = MTPCausalLM(make_backbone(), mtp_num_layers=0)
    with pytest.raises(ValueError, match="mtp_num_layers=0"):
        heads.fit_heads(plain, rows, **ok)


def test_from_preset_starts_fresh_depths_as_identity(tmp_path):
    import keras_hub

    backbone = make_backbone()
    keras_hub.models.LlamaCausalLM(backbone).save_to_preset(str(tmp_path))
    model = MTPCausalLM.from_preset(
        str(tmp_path), mtp_num_layers=1, preprocessor=None
    )
    assert model.mtp_init == "identity"
    kernel = np.asarray(model.mtp_block.mtp_layers[0].projection.kernel)
    d = backbone.hidden_dim
    np.testing.assert_array_equal(kernel[d:], np.eye(d))
    fresh = MTPCausalLM.from_preset(
        str(tmp_path), mtp_num_layers=1, load_weights=False, preprocessor=None
    )
    assert fresh.mtp_init == "random"
    chosen = MTPCausalLM.from_preset(
        str(tmp_path), mtp_num_layers=1, mtp_init="random", preprocessor=None
    )
    assert chosen.mtp_init == "random"


def test_train_py_heads_only_trains_and_saves_a_preset(tmp_path):
    import os
    import sys

    from test_presets import TEXTS
    from test_presets import gpt2_preset

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    import train

    preset = gpt2_preset(str(tmp_path / "trunk"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(" ".join(TEXTS * 4))
    out = tmp_path / "run"
    config = train.parse_config(
        [
            f"--preset={preset}",
            "--heads-only=true",
            "--mtp-num-layers=1",
            "--steps=3",
            "--batch-size=2",
            "--sequence-length=16",
            f"--data={corpus}",
            f"--output-dir={out}",
        ]
    )
    history = train.main(config)
    assert len(history.history["mtp_loss"]) == 1
    loaded = MTPCausalLM.from_preset(str(out / "preset"))
    assert loaded.mtp_num_layers == 1 and loaded.mtp_targets == "main"
    with pytest.raises(ValueError, match="--preset"):
        train.main(train.parse_config(["--heads-only=true"]))
