"""keras_mtp.distribution: the layout map, and training under ModelParallel
and DataParallel gives the loss history of one device.

JAX only, on 8 devices: conftest asks XLA for 8 CPU devices
(`--xla_force_host_platform_device_count=8`).
"""

import contextlib
import re

import keras
import keras_hub
import numpy as np
import pytest
from conftest import BACKBONES
from conftest import VOCAB
from conftest import make_backbone
from conftest import make_batch

import keras_mtp
from keras_mtp.distribution import get_layout_map


def _num_devices():
    if keras.config.backend() != "jax":
        return 0
    import jax

    return len(jax.devices())


pytestmark = pytest.mark.skipif(
    _num_devices() < 8,
    reason="keras.distribution tests need the JAX backend and 8 devices "
    "(XLA_FLAGS=--xla_force_host_platform_device_count=8); found backend "
    f"{keras.config.backend()!r} with {_num_devices()} devices",
)

DEPTHS = 2
STEPS = 4
# A weight this large (and at least 2-D) must be split on the model axis:
# every kernel of the tiny configs, not the MoE routers (16, 4).
LARGE = 128
# Sharded matmuls sum in another order than one device does (float32).
RTOL = 1e-5
ATOL = 1e-6

# conftest's Llama and GPT-2 have 2 query heads and 1 key/value head, which a
# 4-way model axis and a 2-way batch axis cannot split; these can.
SHARDABLE = {
    "llama": lambda: keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    ),
    "gpt2": lambda: keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
        dropout=0.0,
    ),
}


@pytest.fixture(autouse=True)
def no_global_distribution():
    keras.distribution.set_distribution(None)
    yield
    keras.distribution.set_distribution(None)


def make_mesh(shape=(2, 4)):
    devices = keras.distribution.list_devices()[: int(np.prod(shape))]
    return keras.distribution.DeviceMesh(
        shape=shape, axis_names=("batch", "model"), devices=devices
    )


def make_shardable_model(name="llama", seed=0):
    keras.utils.set_random_seed(seed)
    return keras_mtp.MTPCausalLM(SHARDABLE[name](), mtp_num_layers=DEPTHS)


def check_layout_map(model, layout_map):
    """No path matches two keys; every large weight is split on "model"."""
    keys = list(layout_map)
    for variable in model.weights:
        path = variable.path
        # keras looks up an exact key, then `re.fullmatch`; `re.search` is
        # stricter, so it also guards against a looser lookup.
        searched = [key for key in keys if re.search(key, path)]
        assert len(searched) <= 1, f"{path} matches {searched}"
        layout = layout_map[path]  # keras' own lookup; raises if ambiguous
        if len(variable.shape) >= 2 and np.prod(variable.shape) >= LARGE:
            assert layout is not None, f"{path} {variable.shape} replicated"
            assert "model" in layout.axes, f"{path}: {layout.axes}"


def mtp_kernel_paths(model):
    """Each depth's projection and transformer-block kernels."""
    return [
        v.path
        for layer in model.mtp_block.mtp_layers
        for v in layer.weights
        if v.path.endswith("kernel")
    ]


@pytest.mark.parametrize("name", sorted(SHARDABLE))
def test_map_covers_llama_and_gpt2_on_a_2x4_mesh(name):
    model = make_shardable_model(name)
    layout_map = get_layout_map(model, make_mesh((2, 4)))
    check_layout_map(model, layout_map)
    # Each depth's projection and block kernels are on the map, and a block
    # weight gets the layout of the same weight in the backbone's decoder.
    decoder = model.backbone.transformer_layers[-1]
    mtp_paths = mtp_kernel_paths(model)
    assert len(mtp_paths) >= DEPTHS * 5, mtp_paths
    for path in mtp_paths:
        layout = layout_map[path]
        assert layout is not None and "model" in layout.axes, path
        if "transformer_block/" in path:
            relative = path.split("transformer_block/", 1)[1]
            twin = layout_map[f"{decoder.name}/{relative}"]
            assert layout.axes == twin.axes, path
    # keras-hub's Llama map leaves the untied output head out; ours adds it.
    if name == "llama":
        head = layout_map["token_embedding/reverse_embeddings"]
        assert head.axes == ("batch", "model")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_map_is_valid_for_every_backbone(name):
    # conftest's configs have one key/value head, which keras-hub's Llama
    # and Gemma maps split on the batch or model axis; only a 1x1 mesh
    # divides it. The layouts still name the axes, which is what is checked.
    model = keras_mtp.MTPCausalLM(make_backbone(name), mtp_num_layers=DEPTHS)
    layout_map = get_layout_map(model, make_mesh((1, 1)))
    check_layout_map(model, layout_map)
    assert layout_map[mtp_kernel_paths(model)[0]] is not None


def test_errors_name_the_bad_value():
    model = make_shardable_model("llama")
    mesh = make_mesh((2, 4))
    with pytest.raises(ValueError, match="LlamaBackbone"):
        get_layout_map(model.backbone, mesh)
    with pytest.raises(ValueError, match="tuple"):
        get_layout_map(model, ("batch", "model"))
    with pytest.raises(ValueError, match="model_parallel_dim_name='tensor'"):
        get_layout_map(model, mesh, model_parallel_dim_name="tensor")
    with pytest.raises(ValueError, match="data_parallel_dim_name='data'"):
        get_layout_map(model, mesh, data_parallel_dim_name="data")
    with pytest.raises(ValueError, match="different"):
        get_layout_map(model, mesh, data_parallel_dim_name="model")
    # conftest's Llama has one key/value head: the batch axis cannot split it.
    small = keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=1)
    with pytest.raises(ValueError, match="key/kernel.*not divisible"):
        get_layout_map(small, mesh)


def fit_history(model, distribution=None):
    """Loss history of `STEPS` Adam steps on one 8-row batch."""
    x, y, w = make_batch(batch=8)
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:  # the optimizer's variables are placed when created
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        history = model.fit(
            x,
            y,
            sample_weight=w,
            batch_size=8,
            epochs=STEPS,
            shuffle=False,
            verbose=0,
        )
    return {k: np.array(v) for k, v in history.history.items()}


@pytest.fixture(scope="module")
def single_device():
    """The shardable Llama's config, initial weights and loss history."""
    model = make_shardable_model("llama")
    weights = model.get_weights()
    history = fit_history(model)
    return model.get_config(), weights, history, model


def build_in_scope(single_device, distribution):
    config, weights, _, _ = single_device
    with distribution.scope():
        model = keras_mtp.MTPCausalLM.from_config(config)
        model.set_weights(weights)
    return model


def assert_same_history(history, reference):
    assert sorted(history) == sorted(reference)
    assert np.all(np.diff(reference["loss"]) < 0), reference["loss"]
    for key, expected in reference.items():
        np.testing.assert_allclose(
            history[key], expected, rtol=RTOL, atol=ATOL, err_msg=key
        )


def test_model_parallel_shards_mtp_and_matches_one_device(single_device):
    mesh = make_mesh((2, 4))
    _, _, reference, trained = single_device
    layout_map = get_layout_map(trained, mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    model = build_in_scope(single_device, distribution)
    sharded = mtp_kernel_paths(model) + ["token_embedding/reverse_embeddings"]
    by_path = {v.path: v for v in model.weights}
    for path in sharded:
        sharding = by_path[path].value.sharding
        assert "model" in sharding.spec, (path, sharding.spec)
        assert not sharding.is_fully_replicated, path
    history = fit_history(model, distribution)
    assert_same_history(history, reference)
    # Still sharded after training.
    path = "mtp_block/mtp_layer_2/projection/kernel"
    assert tuple(by_path[path].value.sharding.spec) == ("batch", "model")
    for mine, theirs in zip(model.weights, trained.weights):
        np.testing.assert_allclose(
            np.asarray(mine.value), np.asarray(theirs.value), atol=1e-5
        )


def test_data_parallel_matches_one_device(single_device):
    _, _, reference, _ = single_device
    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()
    )
    model = build_in_scope(single_device, distribution)
    assert len(model.weights[0].value.sharding.device_set) == 8
    history = fit_history(model, distribution)
    assert_same_history(history, reference)
