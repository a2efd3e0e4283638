"""MTPCausalLM as a user drives it: fit, evaluate, predict, save/load."""

import os

import keras
import keras_hub
import numpy as np
import pytest
from conftest import LENGTH
from conftest import aux_loss_gradients
from conftest import clone_backbone
from conftest import fast_compilation
from conftest import make_backbone
from conftest import make_batch
from keras import ops

import keras_mtp
from keras_mtp import backbones

DEPTHS = 2


def np_(x):
    return ops.convert_to_numpy(x)


def make_model(name="llama", num_layers=DEPTHS, seed=0, **kwargs):
    return keras_mtp.MTPCausalLM(
        make_backbone(name, seed), mtp_num_layers=num_layers, **kwargs
    )


def test_fit_on_fresh_model_logs_every_metric():
    model = make_model(mtp_loss_scaling_factor=0.25)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, w = make_batch(pad_last=3)
    history = model.fit(x, y, sample_weight=w, epochs=2, verbose=0)
    expected = {"loss", "main_loss", "mtp_loss", "sparse_categorical_accuracy"}
    expected |= {f"mtp_loss_{k}" for k in (1, 2)}
    expected |= {f"mtp_accuracy_{k}" for k in (1, 2)}
    expected |= {f"mtp_acceptance_{k}" for k in (1, 2)}
    assert set(history.history) == expected
    for values in history.history.values():
        assert np.all(np.isfinite(values))
    logs = model.evaluate(x, y, sample_weight=w, return_dict=True, verbose=0)
    assert set(logs) == expected
    # One batch: total = main + λ · mean of the depths, and the depths' mean
    # is mtp_loss.
    np.testing.assert_allclose(
        logs["loss"], logs["main_loss"] + 0.25 * logs["mtp_loss"], rtol=1e-5
    )
    np.testing.assert_allclose(
        logs["mtp_loss"],
        (logs["mtp_loss_1"] + logs["mtp_loss_2"]) / 2,
        rtol=1e-5,
    )


@pytest.mark.parametrize("packed", [False, True])
def test_evaluate_depth_losses_match_the_block(packed):
    model = make_model()
    model.compile(optimizer="adam")
    x, y, w = make_batch(pad_last=2)
    segments = None
    if packed:  # two documents per row, then the padding
        segments = np.where(np.arange(12) < 5, 1, 2) * x["padding_mask"]
        x = {**x, "segment_ids": segments}
    logs = model.evaluate(x, y, sample_weight=w, return_dict=True, verbose=0)
    hidden = backbones.call_backbone(  # packed: the segment-masked trunk
        model.backbone,
        {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]},
        segments,
    )
    losses = np_(
        model.mtp_block(
            hidden, x["token_ids"], x["padding_mask"], segment_ids=segments
        )["losses"]
    )
    np.testing.assert_allclose(
        [logs["mtp_loss_1"], logs["mtp_loss_2"]], losses, rtol=1e-5
    )


@pytest.mark.parametrize("chunk, targets", [(None, "labels"), (5, "main")])
def test_evaluate_logs_acceptance_against_numpy(chunk, targets):
    # mtp_acceptance_k: depth k's top-1 at i equal to the main head's top-1
    # at i + k, over w^k (packed rows with padding); mtp_accuracy_k: against
    # the data's x[i+k+1]. Dense and chunked, label and distilled targets.
    from test_mtp_block import numpy_mtp_losses
    from test_mtp_block import numpy_targets_and_weights

    model = make_model(loss_chunk_size=chunk, mtp_targets=targets)
    model.compile(optimizer="adam")
    x, y, w = make_batch(pad_last=2)
    ids, mask = x["token_ids"], x["padding_mask"]
    segments = np.where(np.arange(12) < 5, 1, 2) * mask
    x = {**x, "segment_ids": segments}
    logs = model.evaluate(x, y, sample_weight=w, return_dict=True, verbose=0)
    hidden = np_(
        backbones.call_backbone(
            model.backbone, {"token_ids": ids, "padding_mask": mask}, segments
        )
    )
    expected = {}
    losses = numpy_mtp_losses(
        model.mtp_block, hidden, ids, mask, segments, expected
    )
    main = np_(model(x)).argmax(-1)  # the main head's top-1, (B, T)
    for k in (1, 2):
        weights = numpy_targets_and_weights(ids, mask, segments, k)[1]
        drafts = expected["predictions"][k - 1]
        hits = (drafts[:, :-k] == main[:, k:]) * weights[:, :-k]
        acceptance = hits.sum() / max(weights.sum(), 1.0)
        assert 0.0 < weights.sum() and weights[:, -k:].sum() == 0.0
        np.testing.assert_allclose(
            logs[f"mtp_acceptance_{k}"], acceptance, atol=1e-6
        )
        np.testing.assert_allclose(
            logs[f"mtp_accuracy_{k}"], expected["accuracies"][k - 1], atol=1e-6
        )
        np.testing.assert_allclose(
            logs[f"mtp_loss_{k}"], losses[k - 1], atol=1e-5
        )


def test_mtp_never_runs_outside_fit_and_evaluate():
    model = make_model()
    assert model.losses == []  # nothing at build / init
    x, y, _ = make_batch()
    logits = model(x)
    assert model.losses == []
    model(x, training=False)
    assert model.losses == []
    assert logits.shape == (4, 12, 32)
    model.compile(optimizer="adam")
    np.testing.assert_allclose(
        model.predict(x, verbose=0), np_(logits), atol=1e-6
    )
    outputs = model(x, training=True)  # a training step's y_pred
    assert len(model.losses) == 1
    assert sorted(outputs) == [
        "logits",
        "mtp_accuracies",
        "mtp_losses",
        "mtp_predictions",
        "mtp_tokens",
        "mtp_weights",
    ]
    assert outputs["mtp_losses"].shape == (2,)
    assert outputs["mtp_predictions"].shape == (2, 4, 12)


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma"])
def test_zero_depths_is_keras_hub_causal_lm(name):
    backbone = make_backbone(name)
    reference = keras_hub.models.CausalLM  # the keras-hub task of each family
    task_class = {
        "gpt2": keras_hub.models.GPT2CausalLM,
        "llama": keras_hub.models.LlamaCausalLM,
        "gemma": keras_hub.models.GemmaCausalLM,
    }[name]
    assert issubclass(task_class, reference)
    hub = task_class(backbone=clone_backbone(backbone), preprocessor=None)
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=0)
    assert model.mtp_block is None
    assert model.count_params() == hub.count_params()
    x, y, w = make_batch(pad_last=2)
    np.testing.assert_allclose(np_(model(x)), np_(hub(x)), atol=1e-6)
    hub.compile(optimizer="sgd")
    model.compile(optimizer="sgd")
    hub_logs = hub.evaluate(x, y, sample_weight=w, return_dict=True, verbose=0)
    logs = model.evaluate(x, y, sample_weight=w, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["loss"], hub_logs["loss"], rtol=1e-6)
    assert set(logs) == {"loss", "main_loss", "sparse_categorical_accuracy"}


def test_zero_scale_trains_like_keras_hub_causal_lm():
    backbone = make_backbone("llama")
    hub = keras_hub.models.LlamaCausalLM(
        backbone=clone_backbone(backbone), preprocessor=None
    )
    model = keras_mtp.MTPCausalLM(
        backbone, mtp_num_layers=DEPTHS, mtp_loss_scaling_factor=0.0
    )
    hub.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y, w = make_batch(batch=8, pad_last=3)
    kwargs = dict(sample_weight=w, batch_size=4, epochs=3, shuffle=False)
    hub_history = hub.fit(x, y, verbose=0, **kwargs).history
    history = model.fit(x, y, verbose=0, **kwargs).history
    np.testing.assert_allclose(history["loss"], hub_history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history["main_loss"], history["loss"], 1e-6)
    assert history["loss"][-1] < history["loss"][0]  # it did train
    for ours, theirs in zip(model.backbone.weights, hub.backbone.weights):
        np.testing.assert_allclose(np_(ours), np_(theirs), atol=1e-5)


@pytest.mark.parametrize(
    "detach, targets", [(True, "labels"), (False, "labels"), (True, "main")]
)
def test_detach_trunk_zeroes_trunk_gradients_of_mtp_loss(detach, targets):
    # With "main" targets the teacher z^0 reads the trunk too: detached,
    # no gradient may reach it that way either.
    model = make_model(
        mtp_detach_trunk=detach,
        mtp_loss_scaling_factor=1.0,
        mtp_targets=targets,
    )
    x, _, _ = make_batch()
    grads = aux_loss_gradients(model, x)
    trunk = {v.path for v in model.backbone.trainable_variables}
    mtp = {v.path for v in model.mtp_block.mtp_layers[0].trainable_variables}
    assert trunk and mtp
    for path in trunk:
        if detach:
            assert np.all(grads[path] == 0.0), path
    if not detach:
        embedding = model.backbone.token_embedding.embeddings.path
        assert np.abs(grads[embedding]).max() > 0
        block = model.backbone.transformer_layers[0].trainable_variables[0]
        assert np.abs(grads[block.path]).max() > 0
    for path in mtp:
        if "transformer_block" in path and "kernel" in path:
            assert np.abs(grads[path]).max() > 0, path


def test_scheduler_sets_scale_by_global_step():
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, w = make_batch(batch=8)
    seen = []

    def schedule(step):
        seen.append(step)
        return 0.0 if step < 2 else 1.0

    scheduler = keras_mtp.callbacks.MTPLossScheduler(schedule)
    history = model.fit(
        x,
        y,
        sample_weight=w,
        batch_size=4,
        epochs=2,
        callbacks=[scheduler],
        shuffle=False,
        verbose=0,
    ).history
    assert seen == [0, 1, 2, 3]  # 0-based, across epochs
    assert model.mtp_loss_scaling_factor == 1.0
    assert history["mtp_loss_scaling_factor"] == [0.0, 1.0]
    # Epoch 1 ran with λ = 0, epoch 2 with λ = 1 (no recompile needed).
    np.testing.assert_allclose(history["loss"][0], history["main_loss"][0])
    np.testing.assert_allclose(
        history["loss"][1],
        history["main_loss"][1] + history["mtp_loss"][1],
        rtol=1e-5,
    )
    # A new fit continues the count from the optimizer's iterations.
    seen.clear()
    model.fit(
        x, y, sample_weight=w, batch_size=4, callbacks=[scheduler], verbose=0
    )
    assert seen == [4, 5]


def test_scheduler_rejects_bad_values():
    model = make_model()
    model.compile(optimizer="adam")
    x, y, w = make_batch()
    scheduler = keras_mtp.callbacks.MTPLossScheduler(lambda step: -1.0)
    with pytest.raises(ValueError, match="-1.0"):
        model.fit(x, y, callbacks=[scheduler], verbose=0)
    with pytest.raises(ValueError, match="mtp_num_layers=0"):
        zero = make_model(num_layers=0)
        zero.compile(optimizer="adam")
        zero.fit(x, y, callbacks=[scheduler], verbose=0)


def test_gradient_accumulation_keeps_the_mtp_term():
    x, y, w = make_batch(batch=8)
    weights = {}
    for steps, batch_size in [(None, 8), (2, 4)]:
        model = make_model(mtp_loss_scaling_factor=0.5)
        model.compile(
            optimizer=keras.optimizers.SGD(
                0.5, gradient_accumulation_steps=steps
            )
        )
        model.fit(
            x,
            y,
            sample_weight=w,
            batch_size=batch_size,
            shuffle=False,
            verbose=0,
        )
        weights[steps] = {v.path: np_(v) for v in model.trainable_variables}
    initial = {v.path: np_(v) for v in make_model().trainable_variables}
    for path, full in weights[None].items():
        np.testing.assert_allclose(weights[2][path], full, atol=2e-6)
    moved = [
        p
        for p in initial
        if "mtp_block" in p and np.abs(weights[2][p] - initial[p]).max() > 1e-4
    ]
    assert moved, "the MTP layers must be updated by the accumulated step"


def test_save_load_restores_scale_and_continues_identically(tmp_path):
    x, y, w = make_batch(batch=8, pad_last=2)
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0)
    model.mtp_loss_scaling_factor = 0.37
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_mtp.MTPCausalLM)
    assert loaded.mtp_loss_scaling_factor == pytest.approx(0.37)
    assert int(np_(loaded.optimizer.iterations)) == 2
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    histories = [
        m.fit(
            x,
            y,
            sample_weight=w,
            batch_size=4,
            epochs=2,
            shuffle=False,
            verbose=0,
        ).history
        for m in (model, loaded)
    ]
    np.testing.assert_allclose(
        histories[1]["loss"], histories[0]["loss"], rtol=1e-6
    )
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(np_(a), np_(b), atol=1e-6)


def test_get_config_round_trips():
    model = make_model(
        mtp_loss_scaling_factor=0.2, mtp_detach_trunk=True, mtp_targets="main"
    )
    config = model.get_config()
    revived = keras_mtp.MTPCausalLM.from_config(config)
    assert revived.get_config() == config
    assert revived.mtp_detach_trunk and revived.mtp_num_layers == DEPTHS
    assert revived.mtp_block.mtp_targets == "main"
    assert revived.mtp_loss_scaling_factor == pytest.approx(0.2)
    assert revived.count_params() == model.count_params()


def test_parameter_counts_pinned():
    plain = make_model(num_layers=0).count_params()
    one = make_model(num_layers=1).count_params()
    two = make_model(num_layers=2).count_params()
    # Llama, V=32, d=16: untied embedding and head 2·512, one decoder 2336
    # (attention 16·16 + 2·16·8 + 16·16, MLP 3·16·32, two norms 2·16),
    # final norm 16.
    assert plain == 2 * 512 + 2336 + 16
    # Each depth: RMSNorms 2·16, W_k 32·16, decoder 2336, output norm 16;
    # plus λ (non-trainable).
    assert one - plain == 32 + 512 + 2336 + 16 + 1
    assert two - one == 32 + 512 + 2336 + 16


def test_bad_arguments_name_the_value():
    backbone = make_backbone("llama")
    with pytest.raises(ValueError, match="mtp_num_layers=-1"):
        keras_mtp.MTPCausalLM(backbone, mtp_num_layers=-1)
    with pytest.raises(ValueError, match="-0.1"):
        keras_mtp.MTPCausalLM(backbone, mtp_loss_scaling_factor=-0.1)
    with pytest.raises(ValueError, match="mtp_targets='soft'"):
        keras_mtp.MTPCausalLM(backbone, mtp_targets="soft")
    bert = keras_hub.models.BertBackbone(
        vocabulary_size=32,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )
    with pytest.raises(ValueError, match="BertBackbone"):
        keras_mtp.MTPCausalLM(bert)
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=0)
    with pytest.raises(ValueError, match="mtp_num_layers=0"):
        model.mtp_loss_scaling_factor = 0.5
    with pytest.raises(ValueError, match="token_ids"):
        model(np.ones((2, 4), "int32"))


def test_too_short_inputs_for_depth_raise_in_fit():
    model = make_model(num_layers=3)
    model.compile(optimizer="adam")
    x, y, w = make_batch(length=4)
    with pytest.raises(ValueError, match="at least num_layers \\+ 2 = 5"):
        model.fit(x, y, sample_weight=w, verbose=0)


def test_all_padding_batch_trains_with_zero_mtp_loss():
    model = make_model()
    model.compile(optimizer="adam")
    x, y, w = make_batch()
    x = {k: np.zeros_like(v) for k, v in x.items()}
    logs = model.fit(
        x, np.zeros_like(y), sample_weight=np.zeros_like(w), verbose=0
    ).history
    assert logs["mtp_loss"] == [0.0]
    assert logs["loss"] == [0.0]


def test_mixed_bfloat16_trains_with_finite_float32_metrics():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = make_model()
    finally:
        keras.config.set_dtype_policy(policy)
    assert model.mtp_block.mtp_layers[0].compute_dtype == "bfloat16"
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, w = make_batch(pad_last=2)
    assert keras.backend.standardize_dtype(model(x).dtype) == "bfloat16"
    history = model.fit(x, y, sample_weight=w, epochs=2, verbose=0).history
    for values in history.values():
        assert np.all(np.isfinite(values))
    assert history["loss"][1] < history["loss"][0]


def count_traces(schedule):
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    traces = []
    call = model.mtp_block.call

    def counting_call(*args, **kwargs):
        traces.append(1)  # Python runs only while a step is traced
        return call(*args, **kwargs)

    model.mtp_block.call = counting_call
    x, y, w = make_batch(batch=16)
    scheduler = keras_mtp.callbacks.MTPLossScheduler(schedule)
    model.fit(
        x, y, sample_weight=w, batch_size=4, callbacks=[scheduler], verbose=0
    )
    assert model.mtp_loss_scaling_factor == pytest.approx(schedule(3))
    return len(traces)


def test_changing_scale_does_not_retrace():
    constant = count_traces(lambda step: 0.1)
    if keras.config.backend() == "torch":
        # Keras runs torch steps eagerly (no jit_compile on torch), so the
        # block's Python runs once per step: 16 rows / batches of 4.
        assert constant == 4
    else:
        assert 1 <= constant <= 2  # one trace (TF's tf.function may take two)
    assert count_traces(lambda step: 0.1 * step) == constant


def test_fit_on_keras_hub_preprocessor_output():
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "ab": 5}
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=["a b"])
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=LENGTH
    )
    model = make_model("gpt2")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, w = preprocessor(["abc ab cab", "a b", "ccc abab", "b"])
    history = model.fit(x, y, sample_weight=w, epochs=2, verbose=0).history
    assert history["loss"][1] < history["loss"][0]
    assert np.isfinite(history["mtp_loss_2"]).all()


@pytest.mark.parametrize(
    "detach, targets", [(False, "labels"), (True, "labels"), (False, "main")]
)
def test_chunked_mtp_loss_matches_dense(detach, targets):
    kwargs = dict(
        mtp_detach_trunk=detach,
        mtp_loss_scaling_factor=1.0,
        mtp_targets=targets,
    )
    dense = make_model(**kwargs)
    chunked = make_model(loss_chunk_size=7, **kwargs)  # 48 = 6·7 + 6
    chunked.set_weights(dense.get_weights())
    x, _, _ = make_batch(pad_last=3)
    losses = [
        np_(
            m.mtp_block(m.backbone(x), x["token_ids"], x["padding_mask"])[
                "losses"
            ]
        )
        for m in (dense, chunked)
    ]
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5)
    grads = [aux_loss_gradients(m, x) for m in (dense, chunked)]
    assert list(grads[0]) == list(grads[1])
    for path in grads[0]:
        np.testing.assert_allclose(
            grads[1][path], grads[0][path], atol=1e-5, err_msg=path
        )
    assert chunked.get_config()["loss_chunk_size"] == 7


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_chunked_training_matches_dense(name):
    # Chunking every head (main and MTP) changes no loss, metric or update.
    histories, weights = [], []
    for chunk in (None, 7):
        model = make_model(name, loss_chunk_size=chunk)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        x, y, w = make_batch(pad_last=3)
        history = model.fit(x, y, sample_weight=w, epochs=2, verbose=0)
        history = dict(history.history)
        history.update(
            model.evaluate(x, y, sample_weight=w, return_dict=True, verbose=0)
        )
        histories.append(history)
        weights.append(model.get_weights())
    assert set(histories[0]) == set(histories[1])
    for key in histories[0]:
        np.testing.assert_allclose(
            histories[1][key], histories[0][key], atol=1e-5, err_msg=key
        )
    for a, b in zip(*weights):
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert model.get_config()["loss_chunk_size"] == 7


def test_chunked_model_rejects_other_losses_and_bad_chunks():
    model = make_model(loss_chunk_size=4)
    with pytest.raises(ValueError, match="mean_squared_error"):
        model.compile(loss="mean_squared_error")
    with pytest.raises(ValueError, match="loss_chunk_size=0"):
        make_model(loss_chunk_size=0)


@pytest.mark.parametrize("chunk", [None, 5])
def test_epoch_metrics_add_up_with_a_ragged_last_batch(chunk):
    # 10 rows in batches of 4, 4 and 2: Keras weights `loss` by batch size,
    # so every logged loss must too, or the epoch's `loss` is not
    # `main_loss + λ · mtp_loss`.
    lam = 0.3
    model = make_model(mtp_loss_scaling_factor=lam, loss_chunk_size=chunk)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, w = make_batch(batch=10, pad_last=4)
    w[3, :] = 0.0  # a row with no main-loss weight
    x["padding_mask"][2, 2:] = 0  # and one with few valid MTP positions
    kwargs = dict(sample_weight=w, batch_size=4, verbose=0)
    history = model.fit(x, y, shuffle=False, **kwargs).history
    train = {key: values[0] for key, values in history.items()}
    logs = model.evaluate(x, y, return_dict=True, **kwargs)
    for epoch in (train, logs):
        np.testing.assert_allclose(
            epoch["loss"], epoch["main_loss"] + lam * epoch["mtp_loss"], 1e-5
        )
        np.testing.assert_allclose(
            epoch["mtp_loss"],
            (epoch["mtp_loss_1"] + epoch["mtp_loss_2"]) / 2,
            rtol=1e-5,
        )
    # The same epoch, batch by batch: losses weighted by rows, accuracies by
    # valid tokens (counted by the NumPy rule of test_mtp_block).
    from test_mtp_block import numpy_targets_and_weights

    batches = [slice(0, 4), slice(4, 8), slice(8, 10)]
    per_batch, rows, tokens = [], [], []
    for part in batches:
        xb = {k: v[part] for k, v in x.items()}
        per_batch.append(
            model.evaluate(
                xb, y[part], sample_weight=w[part], return_dict=True, verbose=0
            )
        )
        rows.append(part.stop - part.start)
        tokens.append(
            [
                numpy_targets_and_weights(
                    xb["token_ids"], xb["padding_mask"], None, k
                )[1].sum()
                for k in (1, 2)
            ]
        )
    tokens = np.array(tokens)  # (batches, D)
    for key in ("loss", "main_loss", "mtp_loss", "mtp_loss_1", "mtp_loss_2"):
        expected = np.average([b[key] for b in per_batch], weights=rows)
        np.testing.assert_allclose(logs[key], expected, rtol=1e-5, err_msg=key)
    for key in ("mtp_accuracy", "mtp_acceptance"):
        for k in (1, 2):
            expected = np.average(
                [b[f"{key}_{k}"] for b in per_batch], weights=tokens[:, k - 1]
            )
            np.testing.assert_allclose(
                logs[f"{key}_{k}"], expected, rtol=1e-5, err_msg=key
            )


def test_models_compile_themselves_with_defaults(tmp_path):
    # keras-hub's tasks compile on construction (`Task(compile=True)`): a
    # new or loaded model evaluates, fits and generates at once.
    x, y, w = make_batch()
    model = make_model()
    assert model.compiled
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    with fast_compilation():
        logs = model.evaluate(x, y, return_dict=True, verbose=0)
    assert np.isfinite(logs["mtp_loss_2"])
    assert not make_model(compile=False).compiled
    # The user's own compile wins, and so does the one a `.keras` file
    # saved.
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    model.save(tmp_path / "sgd.keras")
    loaded = keras.saving.load_model(tmp_path / "sgd.keras")
    assert isinstance(loaded.optimizer, keras.optimizers.SGD)
    assert float(np_(loaded.optimizer.learning_rate)) == pytest.approx(0.5)
    # A file saved uncompiled loads compiled with the defaults, and fits.
    make_model(compile=False).save(tmp_path / "bare.keras")
    loaded = keras.saving.load_model(tmp_path / "bare.keras")
    assert isinstance(loaded.optimizer, keras.optimizers.Adam)
    with fast_compilation():
        history = loaded.fit(x, y, sample_weight=w, verbose=0).history
    assert np.isfinite(history["mtp_loss_2"]).all()
    # A chunked model's defaults are its chunked loss (its `compile` refuses
    # any other loss), also after `compile_from_config`.
    make_model(loss_chunk_size=5).save(tmp_path / "chunked.keras")
    loaded = keras.saving.load_model(tmp_path / "chunked.keras")
    with fast_compilation():
        logs = loaded.evaluate(x, y, return_dict=True, verbose=0)
    assert np.isfinite(logs["sparse_categorical_accuracy"])
