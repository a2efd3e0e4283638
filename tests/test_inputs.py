"""Bad inputs give one clear error that names the bad value, before Keras
starts a step, and leave the model usable; nothing is silently wrong."""

import keras
import numpy as np
import pytest
from conftest import VOCAB
from conftest import make_backbone
from conftest import make_batch

import keras_mtp


def make_model(num_layers=2, **kwargs):
    model = keras_mtp.MTPCausalLM(
        make_backbone("llama"), mtp_num_layers=num_layers, **kwargs
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def fits(model):
    """The model still trains and predicts after an error."""
    x, y, w = make_batch(pad_last=2)
    history = model.fit(x, y, sample_weight=w, verbose=0).history
    assert np.isfinite(history["loss"][0])
    assert np.isfinite(model.predict(x, verbose=0)).all()


def test_segment_ids_of_another_shape_raise_naming_both_shapes():
    model = make_model()
    x, y, w = make_batch()
    x = {**x, "segment_ids": np.ones((4, 1), "int32")}  # would broadcast
    message = r"shape of `token_ids`, \(4, 12\).*segment_ids of shape \(4, 1\)"
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, sample_weight=w, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.evaluate(x, y, sample_weight=w, verbose=0)
    with pytest.raises(ValueError, match=message):
        model(x, training=True)
    bad_mask = {**x, "segment_ids": None, "padding_mask": np.ones((4, 11))}
    with pytest.raises(ValueError, match="padding_mask of shape"):
        model.fit(bad_mask, y, verbose=0)
    fits(model)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("token_ids", VOCAB, f"an id {VOCAB}"),
        ("token_ids", -1, "an id -1"),
        ("y", VOCAB + 5, f"an id {VOCAB + 5}"),
        ("y", -3, "an id -3"),
    ],
)
def test_ids_out_of_range_raise_naming_the_id(key, value, message):
    model = make_model()
    x, y, w = make_batch()
    if key == "token_ids":
        x = {**x, "token_ids": x["token_ids"].copy()}
        x["token_ids"][1, 3] = value
    else:
        y = y.copy()
        y[2, 5] = value
    message = rf"vocabulary_size={VOCAB}\)\. Received: {message}"
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, sample_weight=w, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.evaluate(x, y, sample_weight=w, verbose=0)
    if key == "token_ids":
        with pytest.raises(ValueError, match=message):
            model.predict(x, verbose=0)
    fits(model)


def test_float_ids_raise():
    model = make_model()
    x, y, w = make_batch()
    floats = {**x, "token_ids": x["token_ids"] + 0.7}  # would truncate
    with pytest.raises(ValueError, match="`token_ids` must be integers"):
        model.fit(floats, y, sample_weight=w, verbose=0)
    with pytest.raises(ValueError, match="`token_ids` must be integers"):
        model(floats)
    with pytest.raises(ValueError, match="`y` must be integer"):
        model.fit(x, y.astype("float32"), sample_weight=w, verbose=0)
    fits(model)


def test_too_short_batch_costs_one_error_not_the_model():
    # On JAX an error inside the first traced step comes after `fit` has
    # moved the variables out of the model, which then cannot be used.
    model = make_model(num_layers=3)
    x, y, w = make_batch(length=4)
    with pytest.raises(ValueError, match="at least num_layers \\+ 2 = 5"):
        model.fit(x, y, sample_weight=w, verbose=0)
    with pytest.raises(ValueError, match="at least num_layers \\+ 2 = 5"):
        model.evaluate(x, y, sample_weight=w, verbose=0)
    with pytest.raises(ValueError, match="at least num_layers \\+ 2 = 5"):
        model.fit(
            *make_batch(),
            validation_data=(x, y, w),
            verbose=0,
        )
    fits(model)
    predicted = model.predict(x, verbose=0)  # short inputs predict fine
    assert predicted.shape == (4, 4, VOCAB)


def test_tf_data_spec_is_checked_before_the_step():
    tf = pytest.importorskip("tensorflow")
    model = make_model(num_layers=3)
    x, y, w = make_batch(length=4)
    short = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(2)
    with pytest.raises(ValueError, match="at least num_layers \\+ 2 = 5"):
        model.fit(short, verbose=0)
    x, y, w = make_batch()
    x = {**x, "segment_ids": np.ones((4, 3), "int32")}
    wrong = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(2)
    with pytest.raises(ValueError, match="segment_ids of shape"):
        model.fit(wrong, verbose=0)
    fits(model)


def test_unbatched_text_dataset_is_refused_and_the_model_still_works():
    # A dataset of single strings would reach the traced step as (T,)
    # rows; on JAX an error there leaves the model unusable.
    tf = pytest.importorskip("tensorflow")
    import keras_hub
    from test_presets import TEXTS
    from test_presets import gpt2_parts

    backbone, tokenizer = gpt2_parts()
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=12
    )
    model = keras_mtp.MTPCausalLM(backbone, preprocessor, mtp_num_layers=1)
    model.compile()
    logs = model.evaluate(TEXTS, batch_size=4, return_dict=True, verbose=0)
    unbatched = tf.data.Dataset.from_tensor_slices(TEXTS)
    message = r"must be batched.*Received: elements of shape \(\)"
    with pytest.raises(ValueError, match=message):
        model.evaluate(unbatched, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.predict(unbatched, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.fit(unbatched, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.fit(TEXTS, validation_data=unbatched, verbose=0)
    rows = tf.data.Dataset.from_tensor_slices([[t] for t in TEXTS]).batch(4)
    with pytest.raises(ValueError, match=r"shape \(None, 1\)"):
        model.evaluate(rows, verbose=0)
    # Refused before Keras started a step: the model still works.
    again = model.evaluate(TEXTS, batch_size=4, return_dict=True, verbose=0)
    for key, value in logs.items():
        np.testing.assert_allclose(again[key], value, rtol=1e-6, err_msg=key)
    batched = model.evaluate(unbatched.batch(4), return_dict=True, verbose=0)
    np.testing.assert_allclose(batched["loss"], logs["loss"], rtol=1e-6)
    predicted = model.predict(TEXTS, verbose=0)
    assert predicted.shape == (8, 12, backbone.vocabulary_size)


def test_integer_types_are_accepted_and_bools_refused():
    backbone = make_backbone("llama")
    model = keras_mtp.MTPCausalLM(
        backbone, mtp_num_layers=np.int64(2), loss_chunk_size=np.int32(8)
    )
    assert model.mtp_num_layers == 2 and type(model.mtp_num_layers) is int
    assert model.loss_chunk_size == 8 and type(model.loss_chunk_size) is int
    assert model.get_config()["mtp_num_layers"] == 2
    with pytest.raises(ValueError, match="mtp_num_layers=True"):
        keras_mtp.MTPCausalLM(backbone, mtp_num_layers=True)
    with pytest.raises(ValueError, match="mtp_num_layers=2.0"):
        keras_mtp.MTPCausalLM(backbone, mtp_num_layers=2.0)
    with pytest.raises(ValueError, match="loss_chunk_size=True"):
        keras_mtp.MTPCausalLM(backbone, loss_chunk_size=True)
