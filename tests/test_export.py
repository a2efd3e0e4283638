"""`model.export`: the inference path (main logits from `token_ids` and
`padding_mask`, MTP never part of it) as a TensorFlow SavedModel, reloaded
with `tf.saved_model.load` and served, for every family of
`keras_mtp.backbones.FAMILIES` whose backbone exports; the others fail as
README says, so a new keras-hub, JAX or TensorFlow that fixes them fails
here until README is updated."""

import os

import keras
import numpy as np
import pytest
from conftest import BACKBONES
from conftest import fast_compilation
from conftest import make_backbone
from conftest import make_batch
from keras import ops

import keras_mtp

ATOL = 1e-5  # served vs `predict` logits (measured: at most 8.3e-7)
# A learned position table (gpt2) and rotary positions (llama), with another
# batch size and length too: run in every CI leg, the rest marked slow.
FAST = ("gpt2", "llama")
_DELTANET = "Qwen3_5GatedDeltaNet"  # a Python loop over 64-token chunks
_COMPOSITE = "vhlo.composite_v2"  # the MoE router's top_k, JAX 0.10.2
# {family: {backend: what the error says}}: README's families that do not
# export (see "Use it with model.fit").
NOT_EXPORTED = {
    "qwen3_5": {"jax": _DELTANET, "tensorflow": _DELTANET},
    "qwen3_5_moe": {"jax": _DELTANET, "tensorflow": _DELTANET},
    "qwen_moe": {"jax": _COMPOSITE},
    "qwen3_moe": {"jax": _COMPOSITE},
    "mixtral": {"jax": _COMPOSITE},
    "gpt_oss": {"jax": _COMPOSITE},
}


def served(loaded, x):
    import tensorflow as tf

    inputs = {k: tf.constant(v) for k, v in x.items()}
    return loaded.serve(inputs).numpy()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
        for n in BACKBONES
    ],
)
def test_export_serves_the_main_logits(name, tmp_path):
    pytest.importorskip("tensorflow")
    backend = keras.config.backend()
    if backend == "torch":
        pytest.skip("a tf_saved_model is exported on JAX and TensorFlow only")
    with fast_compilation():  # JAX: compiles `predict` in half the time
        check_export(name, backend, tmp_path)


def check_export(name, backend, tmp_path):
    import tensorflow as tf

    model = keras_mtp.MTPCausalLM(make_backbone(name), mtp_num_layers=1)
    x, _, _ = make_batch(pad_last=2)
    path = os.path.join(tmp_path, "exported")
    failure = NOT_EXPORTED.get(name, {}).get(backend)
    if failure:
        with pytest.raises(Exception, match=failure):
            model.export(path, verbose=False)
            served(tf.saved_model.load(path), x)
        return
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(
        served(loaded, x), model.predict(x, verbose=0), atol=ATOL
    )
    if name in FAST:  # any batch and length
        other = {k: v[:2, :7] for k, v in x.items()}
        np.testing.assert_allclose(
            served(loaded, other), ops.convert_to_numpy(model(other)), atol=ATOL
        )


def test_export_leaves_the_callers_jax2tf_kwargs_alone(tmp_path):
    if keras.config.backend() != "jax":
        pytest.skip("jax2tf_kwargs are read on JAX")
    pytest.importorskip("tensorflow")
    model = keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=0)
    options = {"native_serialization": True}
    model.export(
        os.path.join(tmp_path, "exported"), verbose=False, jax2tf_kwargs=options
    )
    assert options == {"native_serialization": True}


def test_torch_exports_with_torch_export(tmp_path):
    # Keras 3.15's tf_saved_model on torch goes through torch_xla and takes
    # a flat list of input specs, never our dict: refused with what to use.
    # Its own "torch" format (torch.export) works, with static shapes.
    if keras.config.backend() != "torch":
        pytest.skip("the torch backend's export")
    import torch

    model = keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=2)
    with pytest.raises(ValueError, match='format="torch"'):
        model.export(os.path.join(tmp_path, "saved_model"), verbose=False)
    x, _, _ = make_batch(pad_last=2)
    spec = keras.InputSpec(shape=x["token_ids"].shape, dtype="int32")
    path = os.path.join(tmp_path, "exported.pt2")
    model.export(
        path,
        format="torch",
        input_signature=[{"token_ids": spec, "padding_mask": spec}],
        verbose=False,
    )
    program = torch.export.load(path).module()
    served = program({k: torch.tensor(v) for k, v in x.items()})
    np.testing.assert_allclose(
        served.detach().numpy(), ops.convert_to_numpy(model(x)), atol=ATOL
    )
