"""keras_mtp.distribution: the layout map (from a backbone class, no model),
weights created sharded from the first byte under train.py's distribution,
and training under ModelParallel and DataParallel gives the loss history of
one device.

JAX only, on 8 devices: conftest asks XLA for 8 CPU devices
(`--xla_force_host_platform_device_count=8`).
"""

import contextlib
import gc
import re
import types

import keras
import keras_hub
import numpy as np
import pytest
from conftest import BACKBONES
from conftest import VOCAB
from conftest import fast_compilation
from conftest import make_backbone
from conftest import make_batch

import keras_mtp
from keras_mtp import backbones
from keras_mtp.distribution import check_layout_map
from keras_mtp.distribution import get_layout_map
from keras_mtp.distribution import make_distribution


def _num_devices():
    if keras.config.backend() != "jax":
        return 0
    import jax

    return len(jax.devices())


pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="keras.distribution shards weights on the JAX backend only",
)
needs_8_devices = pytest.mark.skipif(
    _num_devices() < 8,
    reason="needs 8 JAX devices "
    "(XLA_FLAGS=--xla_force_host_platform_device_count=8); found "
    f"{_num_devices()}",
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


def layout_map_of(model, mesh):
    """The map from the model's backbone class and depth count (no model)."""
    return get_layout_map(
        mesh, type(model.backbone), mtp_num_layers=model.mtp_num_layers
    )


def assert_map_covers(model, layout_map):
    """No path matches two keys; every large weight is split on "model"."""
    check_layout_map(model, layout_map, min_sharded_size=LARGE)
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


@needs_8_devices
@pytest.mark.parametrize("name", sorted(SHARDABLE))
def test_map_covers_llama_and_gpt2_on_a_2x4_mesh(name):
    model = make_shardable_model(name)
    layout_map = layout_map_of(model, make_mesh((2, 4)))
    assert_map_covers(model, layout_map)
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
    # Without MTP depths the map has no MTP key.
    plain = get_layout_map(make_mesh((2, 4)), name, mtp_num_layers=0)
    assert all(layout_map[k] is not None for k in plain)
    assert plain[mtp_paths[0]] is None


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_map_is_valid_for_every_backbone(name):
    # conftest's configs have one key/value head, which keras-hub's Llama
    # and Gemma maps split on the batch or model axis; only a 1x1 mesh
    # divides it. The layouts still name the axes, which is what is checked.
    model = keras_mtp.MTPCausalLM(make_backbone(name), mtp_num_layers=DEPTHS)
    mesh = make_mesh((1, 1))
    layout_map = layout_map_of(model, mesh)
    assert_map_covers(model, layout_map)
    assert layout_map[mtp_kernel_paths(model)[0]] is not None
    # The class, the family name and the serialized config give one map.
    config = keras.saving.serialize_keras_object(model.backbone)
    for backbone in (name, config):
        other = get_layout_map(mesh, backbone, mtp_num_layers=DEPTHS)
        assert {k: v.axes for k, v in other.items()} == {
            k: v.axes for k, v in layout_map.items()
        }
    # Where keras-hub has a map, ours places its weights the same way,
    # except the MoE routers: keras-hub's `.*feedforward_gate_dense.kernel`
    # regex also catches Qwen-MoE's router, which ours leaves replicated
    # (as in the MTP blocks).
    if hasattr(model.backbone, "get_layout_map"):
        theirs = model.backbone.get_layout_map(mesh)
        for variable in model.backbone.weights:
            layout = theirs[variable.path]
            if layout is None or "sparse_feedforward_gate" in variable.path:
                continue
            assert layout_map[variable.path].axes == layout.axes, variable.path


@needs_8_devices
def test_errors_name_the_bad_value():
    model = make_shardable_model("llama")
    mesh = make_mesh((2, 4))
    llama = keras_hub.models.LlamaBackbone
    with pytest.raises(ValueError, match="backbone=<MTPCausalLM"):
        get_layout_map(mesh, model)
    with pytest.raises(ValueError, match="family 'bert'"):
        get_layout_map(mesh, "bert")
    with pytest.raises(ValueError, match="tuple"):
        get_layout_map(("batch", "model"), llama)
    with pytest.raises(ValueError, match="mtp_num_layers=-1"):
        get_layout_map(mesh, llama, mtp_num_layers=-1)
    with pytest.raises(ValueError, match="model_parallel_dim_name='tensor'"):
        get_layout_map(mesh, llama, model_parallel_dim_name="tensor")
    with pytest.raises(ValueError, match="data_parallel_dim_name='data'"):
        get_layout_map(mesh, llama, data_parallel_dim_name="data")
    with pytest.raises(ValueError, match="different"):
        get_layout_map(mesh, llama, data_parallel_dim_name="model")
    layout_map = get_layout_map(mesh, llama, mtp_num_layers=1)
    # conftest's Llama has one key/value head: the batch axis cannot split it.
    small = keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=1)
    with pytest.raises(ValueError, match="key/kernel.*not divisible"):
        check_layout_map(small, layout_map)
    # A key that doubles another's, or a large weight left out, is named.
    twice = get_layout_map(mesh, llama, mtp_num_layers=1)
    twice[r".*projection/kernel"] = ("batch", "model")
    with pytest.raises(ValueError, match="mtp_layer_1/projection/kernel"):
        check_layout_map(model, twice)
    partial = keras.distribution.LayoutMap(mesh)
    with pytest.raises(ValueError, match="token_embedding/embeddings"):
        check_layout_map(model, partial, min_sharded_size=LARGE)
    check_layout_map(model, partial)  # all replicated: valid, if wasteful
    with pytest.raises(ValueError, match="LayoutMap"):
        check_layout_map(model, {})


def test_mtp_num_layers_takes_the_integers_mtp_causal_lm_takes():
    """One integer check for the package: a NumPy integer (as from a
    config array) is a depth count here as in `MTPCausalLM`; a bool, a
    float or a negative count is refused, naming the value."""
    mesh = make_mesh((1, 1))

    def axes(layout_map):
        return {key: layout_map[key].axes for key in layout_map}

    expected = axes(get_layout_map(mesh, "llama", mtp_num_layers=2))
    for depths in (np.int64(2), np.int32(2), np.uint8(2)):
        assert axes(get_layout_map(mesh, "llama", depths)) == expected
    for bad, received in [
        (np.int64(-1), "mtp_num_layers=np.int64(-1)"),
        (True, "mtp_num_layers=True"),
        (2.0, "mtp_num_layers=2.0"),
    ]:
        with pytest.raises(ValueError, match=re.escape(received)):
            get_layout_map(mesh, "llama", mtp_num_layers=bad)


# === Sharded from the first byte =============================================


@contextlib.contextmanager
def record_full_copies(monkeypatch, shard_at_init=True):
    """Records `(path, device)` of each weight given a single-device value.

    Keras (3.15, JAX) gives a variable a concrete value in `_direct_assign`
    (at creation outside a jitted initializer, and on `assign`); a weight
    born sharded is made by a jitted initializer with its sharding as
    output instead (`should_shard_at_init`: Keras does so for weights of
    250 MiB x devices and more; here for every sharded weight, so the tiny
    weights take the path of real ones).
    """
    from keras.src.backend.jax import core

    recorded = []
    direct_assign = core.JaxVariable._direct_assign

    def spy(variable, value):
        sharding = getattr(value, "sharding", None)
        if sharding is not None and len(sharding.device_set) == 1:
            (device,) = sharding.device_set
            recorded.append((variable.path, device))
        return direct_assign(variable, value)

    monkeypatch.setattr(core.JaxVariable, "_direct_assign", spy)
    if shard_at_init:
        monkeypatch.setattr(
            core,
            "should_shard_at_init",
            lambda sharding, shape: not sharding.is_fully_replicated,
        )
    yield recorded


def live_bytes_per_device():
    gc.collect()
    import jax

    held = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def train_config(**overrides):
    """train.py's settings of the shardable Llama (width 16, 4 heads)."""
    fields = dict(
        backbone="llama",
        hidden_dim=16,
        num_layers=1,
        num_heads=4,
        intermediate_dim=32,
        sequence_length=128,
        mtp_num_layers=DEPTHS,
        distribution="model",
        mesh="2,4",
        batch_size=8,
    )
    return types.SimpleNamespace(**{**fields, **overrides})


def train_distribution(config):
    """`make_distribution` with train.py's arguments from `config`."""
    return make_distribution(
        config.distribution,
        config.backbone,
        config.mtp_num_layers,
        config.batch_size,
        config.mesh,
    )


def build_train_model(config):
    backbone = backbones.build_backbone(
        config.backbone,
        VOCAB,
        config.hidden_dim,
        config.num_layers,
        config.num_heads,
        config.intermediate_dim,
        config.sequence_length,
    )
    return keras_mtp.MTPCausalLM(backbone, mtp_num_layers=config.mtp_num_layers)


@needs_8_devices
def test_train_distribution_creates_weights_sharded(monkeypatch):
    config = train_config(mtp_num_layers=1)
    before = live_bytes_per_device()
    with record_full_copies(monkeypatch) as recorded, fast_compilation():
        distribution = train_distribution(config)
        with distribution.scope():
            model = build_train_model(config)
        in_scope = {path for path, _ in recorded}
        # The recorder sees the whole copies of a model built outside any
        # scope (what building a model to read the map off it did).
        keras.distribution.set_distribution(None)
        build_train_model(config)
        unsharded = {path for path, _ in recorded} - in_scope
    after = live_bytes_per_device()
    # train.py's map is this one (built the same way, from the config).
    layout_map = get_layout_map(make_mesh(), "llama", mtp_num_layers=1)
    check_layout_map(model, layout_map, min_sharded_size=LARGE)

    # Each shard has the shape the map's layout gives, computed in NumPy.
    mesh = dict(zip(("batch", "model"), (2, 4)))
    expected = np.zeros(8, np.int64)  # bytes per device
    sharded = 0
    for variable in model.weights:
        value = variable.value
        layout = layout_map[variable.path]
        axes = layout.axes if layout is not None else (None,) * value.ndim
        split = [mesh[a] if a else 1 for a in axes]
        shard_shape = tuple(np.array(value.shape) // np.array(split, int))
        itemsize = np.dtype(value.dtype).itemsize
        if np.prod(split) > 1:
            sharded += value.size * itemsize
            assert variable.path not in in_scope, variable.path
            assert variable.path in unsharded, variable.path
        assert len(value.addressable_shards) == 8, variable.path
        for shard in value.addressable_shards:
            assert shard.data.shape == shard_shape, variable.path
            expected[shard.device.id] += np.prod(shard_shape) * itemsize
        if value.ndim >= 2 and value.size >= LARGE:
            assert np.prod(split) == 8, (variable.path, value.sharding.spec)
    assert sharded > 0.9 * sum(v.value.nbytes for v in model.weights)
    # Every device holds the model's shards and nothing else new (no full
    # copy left alive): a few bytes of random-seed state at most.
    devices = sorted(after, key=lambda d: d.id)
    grown = np.array([after[d] - before.get(d, 0) for d in devices])
    assert np.all(grown - expected <= 64), (grown, expected)
    # The sharded weights take 1/8 of their bytes per device (model and
    # batch axes), below the total / model-axis the issue asks.
    assert expected.max() <= sharded / 4


@needs_8_devices
def test_make_distribution_batch_divides_the_batch_axis(monkeypatch):
    # --mesh=2,4: the batch splits over the batch axis (2), not 8 devices.
    distribution = train_distribution(train_config(batch_size=2))
    assert isinstance(distribution, keras.distribution.ModelParallel)
    layout = distribution.get_data_layout((2, 12))
    assert tuple(layout.axes) == ("batch", None)
    with pytest.raises(
        ValueError, match=r"batch axis of mesh='2,4' \(2\).*batch_size=3"
    ):
        train_distribution(train_config(batch_size=3))
    # DataParallel splits the batch over every device.
    data = train_distribution(train_config(distribution="data", mesh=""))
    assert isinstance(data, keras.distribution.DataParallel)
    with pytest.raises(ValueError, match="8 devices: batch_size=2"):
        train_distribution(
            train_config(distribution="data", mesh="", batch_size=2)
        )
    with pytest.raises(ValueError, match="mesh='2,3'"):
        train_distribution(train_config(mesh="2,3"))
    # Each process feeds whole batch shards: 4 processes cannot share 2.
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(ValueError, match=r"\(2\), which 4 process"):
        train_distribution(train_config(batch_size=8))
    assert train_distribution(train_config(distribution="none")) is None


@needs_8_devices
def test_from_preset_stages_weights_on_the_host(monkeypatch, tmp_path):
    # Accelerators, simulated: devices 4-7 form the mesh and one of them is
    # the default device; the host's CPU (device 0) is not in the mesh.
    import jax

    keras.utils.set_random_seed(0)
    reference = keras_mtp.MTPCausalLM(SHARDABLE["llama"](), mtp_num_layers=1)
    reference.save_to_preset(str(tmp_path))
    reference.save(str(tmp_path / "model.keras"))
    accelerators = jax.devices()[4:8]
    mesh = keras.distribution.DeviceMesh(
        (2, 2), ("batch", "model"), keras.distribution.list_devices()[4:8]
    )
    distribution = keras.distribution.ModelParallel(
        layout_map=get_layout_map(mesh, "llama", mtp_num_layers=1),
        batch_dim_name="batch",
    )
    with (
        record_full_copies(monkeypatch, shard_at_init=False) as recorded,
        jax.default_device(accelerators[0]),
        fast_compilation(),
    ):
        with distribution.scope():
            model = keras_mtp.MTPCausalLM.from_preset(
                str(tmp_path), preprocessor=None
            )
            logits = model.predict(make_batch(batch=8)[0], verbose=0)
        staged = list(recorded)
        recorded.clear()
        with distribution.scope(), keras_mtp.distribution.stage_on_host():
            loaded = keras.saving.load_model(str(tmp_path / "model.keras"))
        staged_load_model = list(recorded)
        # Keras alone: a value read from a file is made whole on the
        # default device (an accelerator) before it is split.
        recorded.clear()
        kernel = model.mtp_block.mtp_layers[0].projection.kernel
        kernel.assign(np.asarray(kernel.value))
        assert recorded == [(kernel.path, accelerators[0])]
    sharded = {
        v.path
        for v in model.weights
        if not v.value.sharding.is_fully_replicated
    }
    assert len(sharded) >= 10, sharded
    # Staged: every sharded weight was loaded, whole only on the host.
    for copies in (staged, staged_load_model):
        assert {path for path, _ in copies} >= sharded
        on_the_mesh = {p for p, device in copies if device in accelerators}
        assert on_the_mesh & sharded == set(), on_the_mesh
    for mine, again, theirs in zip(
        model.weights, loaded.weights, reference.weights
    ):
        assert mine.path == again.path == theirs.path
        for variable in (mine, again):
            devices = variable.value.sharding.device_set
            assert devices == set(accelerators), variable.path
            np.testing.assert_array_equal(
                np.asarray(variable.value), np.asarray(theirs.value)
            )
    assert logits.shape == (8, 12, VOCAB) and np.all(np.isfinite(logits))


# === Training under a distribution ===========================================


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


@needs_8_devices
def test_model_parallel_shards_mtp_and_matches_one_device(single_device):
    mesh = make_mesh((2, 4))
    _, _, reference, trained = single_device
    layout_map = layout_map_of(trained, mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    model = build_in_scope(single_device, distribution)
    check_layout_map(model, layout_map, min_sharded_size=LARGE)
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


@needs_8_devices
def test_data_parallel_matches_one_device(single_device):
    _, _, reference, _ = single_device
    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()
    )
    model = build_in_scope(single_device, distribution)
    assert len(model.weights[0].value.sharding.device_set) == 8
    history = fit_history(model, distribution)
    assert_same_history(history, reference)


def packed_batch(rows=8, length=12, seed=1):
    """Rows packing 2 to 4 documents each, some padded: `(x, y, w)` with
    segment ids and no main-loss weight across a document boundary."""
    rng = np.random.default_rng(seed)
    x, _, _ = make_batch(seed=seed, batch=rows, length=length)
    segments = np.zeros((rows, length), "int32")
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(2, length - 1), 2, replace=False))
        segments[r] = 1 + np.searchsorted(cuts, np.arange(length), "right")
        segments[r, length - r % 3 :] = 0  # padding
    x["padding_mask"] = (segments > 0).astype("int32")
    x["token_ids"] = np.where(segments > 0, x["token_ids"], 0)
    x["segment_ids"] = segments
    y = np.roll(x["token_ids"], -1, axis=1)
    following = np.roll(segments, -1, axis=1)
    following[:, -1] = 0
    w = ((segments == following) & (segments > 0)).astype("float32")
    return x, y, w


@needs_8_devices
def test_packed_rows_on_a_2x4_mesh_give_the_loss_of_one_device():
    """GPT-2 (learned positions restarted per document, the segment mask in
    the trunk and the MTP blocks) evaluated on packed rows, sharded over a
    2x4 mesh, gives one device's losses."""
    x, y, w = packed_batch()
    model = make_shardable_model("gpt2")
    config, weights = model.get_config(), model.get_weights()
    reference = model.evaluate(
        x, y, sample_weight=w, batch_size=8, return_dict=True, verbose=0
    )
    mesh = make_mesh((2, 4))
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map_of(model, mesh), batch_dim_name="batch"
    )
    with distribution.scope():
        sharded = keras_mtp.MTPCausalLM.from_config(config)
        sharded.set_weights(weights)
        logs = sharded.evaluate(
            x, y, sample_weight=w, batch_size=8, return_dict=True, verbose=0
        )
    assert sorted(logs) == sorted(reference)
    for key, expected in reference.items():
        np.testing.assert_allclose(
            logs[key], expected, rtol=RTOL, atol=ATOL, err_msg=key
        )
