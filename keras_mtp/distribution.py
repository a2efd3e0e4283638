"""Layout maps that place the weights of an `MTPCausalLM` on a device mesh.

`get_layout_map` returns a `keras.distribution.LayoutMap` for
`keras.distribution.ModelParallel` (JAX backend) from a backbone class and
the MTP settings alone, as keras-hub's static
`Backbone.get_layout_map(device_mesh)` does: no model is built, so the model
is then created inside `distribution.scope()` and each weight is born with
its layout. `check_layout_map` checks a map against the model built in
scope, and `stage_on_host` keeps the weights read from files off single
accelerators.

Layouts follow keras-hub's Llama map (2D sharding: the model axis for tensor
parallelism, the batch axis for FSDP-style weight sharding):

```
token_embedding/embeddings      (V, d)      (model, batch)
token_embedding/reverse_emb..   (d, V)      (batch, model)
query/key/value kernels         (d, H, hd)  (model, batch, None)
attention_output kernel         (H, hd, d)  (model, None, batch)
feedforward in/gate kernels     (d, f)      (batch, model)
feedforward output kernel       (f, d)      (model, batch)
MoE expert in/gate kernels      (E, d, f)   (model, batch, None)
MoE expert output kernel        (E, f, d)   (model, None, batch)
MTP projection W_k              (2d, d)     (batch, model)
```

Norm scales, biases, MoE routers and the MTP loss weights stay replicated.
"""

import contextlib
import math
import os
import re

import keras
import keras_hub

from keras_mtp import backbones
from keras_mtp.validation import check_choice
from keras_mtp.validation import check_int

# The mesh-axis placeholders of the rules in `keras_mtp.backbones.FAMILIES`.
_MODEL = backbones.MODEL
_DATA = backbones.DATA

# The MTP weights carry the names `MTPLayer` gives its sublayers, after any
# prefix (`mtp_block/mtp_layer_1/`): keys start with `.*`, and no backbone
# weight has a `transformer_block/` or `mtp_layer_k/` component.
_MTP_BLOCK_PREFIX = r".*transformer_block/"
_MTP_RULES = ((r".*mtp_layer_\d+/projection/kernel", (_DATA, _MODEL)),)


def get_layout_map(
    device_mesh,
    backbone,
    mtp_num_layers=1,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
):
    """A `keras.distribution.LayoutMap` for an `MTPCausalLM`, from its config.

    The map shards the backbone, its output head and every MTP depth (the
    projection `W_k` and the transformer block) over `device_mesh`, for
    `keras.distribution.ModelParallel` on the JAX backend. It is built from
    the backbone's family and the MTP settings alone, as keras-hub's
    `Backbone.get_layout_map(device_mesh, ...)` is: no model is built, so
    build the model afterwards inside `distribution.scope()` and each weight
    is created with its layout (never as a full copy on one device first).

    - the backbone: the layouts of keras-hub's own maps (Llama, Gemma, Qwen,
      Qwen-MoE, Qwen3-MoE), written once per family as regular expressions
      over the weight paths (`Family.layout` in `keras_mtp.backbones`), so
      they also cover the families keras-hub has no map for. GPT-2's
      vocabulary (50257) divides no mesh axis, so its token and position
      embeddings (and OPT's) shard the hidden dimension on the model axis.
    - what keras-hub's maps leave replicated: the untied output head
      (`token_embedding/reverse_embeddings`, vocabulary on the model axis)
      and the MoE experts (expert dimension on the model axis). MoE routers
      stay replicated (keras-hub's Qwen-MoE maps shard them by accident of
      a regex; the MTP blocks' and the backbone's routers now agree).
    - each MTP depth: `projection/kernel` `(2d, d)` as `(batch, model)` and
      its transformer block with the layouts of the backbone's decoder
      layers.

    Norm scales, biases, MoE routers and the MTP loss weights match no key:
    Keras replicates them. No variable path matches two keys, and the MTP
    keys start with `.*`, so the map holds whatever prefix or counter the MTP
    weights get. A mesh axis must divide each dimension it shards (head
    counts, widths, vocabulary): JAX refuses to create such a weight
    otherwise (`IndivisibleError`, naming its shape and layout but not its
    path). `check_layout_map(model, layout_map)` checks a built model, naming
    the weight.

    Args:
        device_mesh: `keras.distribution.DeviceMesh`. The mesh to shard on.
        backbone: the keras-hub backbone class (e.g.
            `keras_hub.models.LlamaBackbone`, or a subclass), its family name
            in `keras_mtp.backbones.FAMILY_NAMES` (e.g. `"llama"`), or its
            serialized config (`keras.saving.serialize_keras_object(backbone)`
            or a preset's `config.json`).
        mtp_num_layers: int (a NumPy integer too). The number of MTP depths
            D; 0 maps the backbone alone.
        model_parallel_dim_name: str. The mesh axis that shards the weights
            (tensor, vocabulary and expert parallelism).
        data_parallel_dim_name: str. The mesh axis that shards the batch;
            the weights are also split along it (FSDP-style), as keras-hub's
            maps do.

    Returns:
        `keras.distribution.LayoutMap` on `device_mesh`.

    Raises:
        ValueError: if `device_mesh` is not a `DeviceMesh`, `backbone` is no
            supported backbone class, family or config, `mtp_num_layers` is
            not an integer >= 0, an axis name is not one of the mesh's, or
            the two names are equal.

    Example:

    ```python
    import os
    os.environ["KERAS_BACKEND"] = "jax"
    # 8 CPU devices; on TPU/GPU use the real ones and skip this line.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import keras
    import keras_hub
    import numpy as np
    import keras_mtp
    from keras_mtp.distribution import check_layout_map
    from keras_mtp.distribution import get_layout_map

    mesh = keras.distribution.DeviceMesh(
        shape=(2, 4),
        axis_names=("batch", "model"),
        devices=keras.distribution.list_devices(),
    )
    layout_map = get_layout_map(
        mesh, keras_hub.models.LlamaBackbone, mtp_num_layers=1)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=256, num_layers=2, num_query_heads=8,
            num_key_value_heads=4, hidden_dim=64, intermediate_dim=128)
        model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=1)
        check_layout_map(model, layout_map)
        model.compile(optimizer="adam")
        x = {"token_ids": np.ones((8, 16), "int32"),
             "padding_mask": np.ones((8, 16), "int32")}
        model.fit(x, np.ones((8, 16), "int32"), batch_size=8)

    kernel = model.mtp_block.mtp_layers[0].projection.kernel
    print(kernel.path, kernel.value.sharding.spec)
    # mtp_block/mtp_layer_1/projection/kernel P('batch', 'model')
    ```
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a `keras.distribution.DeviceMesh` (the "
            "first argument; no model is needed). Received: device_mesh of "
            f"type {type(device_mesh).__name__}"
        )
    family = _family(backbone)
    # The integers `MTPCausalLM` takes (NumPy's too, never a bool).
    mtp_num_layers = check_int(mtp_num_layers, "mtp_num_layers")
    axis_names = list(device_mesh.axis_names)
    for arg, value in (
        ("model_parallel_dim_name", model_parallel_dim_name),
        ("data_parallel_dim_name", data_parallel_dim_name),
    ):
        if value not in axis_names:
            raise ValueError(
                f"`{arg}` must be one of the mesh's axis names {axis_names}. "
                f"Received: {arg}={value!r}"
            )
    if model_parallel_dim_name == data_parallel_dim_name:
        raise ValueError(
            "`model_parallel_dim_name` and `data_parallel_dim_name` must be "
            "different mesh axes. Received: both "
            f"{model_parallel_dim_name!r}"
        )

    def resolve(layout):
        names = {_MODEL: model_parallel_dim_name, _DATA: data_parallel_dim_name}
        return tuple(names.get(axis, axis) for axis in layout)

    rules = family.layout
    # === Backbone ===
    keys = list(rules.embedding_rules + rules.extra_rules)
    keys += [(rules.decoder_prefix + k, v) for k, v in rules.decoder_rules]
    # === MTP depths ===
    if mtp_num_layers:
        keys += [(_MTP_BLOCK_PREFIX + k, v) for k, v in rules.decoder_rules]
        keys += list(_MTP_RULES)

    layout_map = keras.distribution.LayoutMap(device_mesh)
    for key, layout in keys:
        layout_map[key] = resolve(layout)
    return layout_map


def check_layout_map(model, layout_map, min_sharded_size=None):
    """Checks `layout_map` against `model`; raises naming the weight if not.

    Run it on the model built inside the distribution's scope (or on any
    model of the same configuration): it reads each weight's path and shape.

    Args:
        model: `keras.Model`. The model the map places (its `weights`).
        layout_map: `keras.distribution.LayoutMap`. The map to check.
        min_sharded_size: int or None. If given, a weight of rank 2 or more
            with at least this many elements must match a key: Keras would
            replicate it on every device.

    Raises:
        ValueError: naming the first weight whose path matches two or more
            keys (Keras refuses it), whose layout does not fit its rank,
            whose sharded dimension a mesh axis does not divide (JAX refuses
            it), or that is at least `min_sharded_size` and matches no key.
    """
    if not isinstance(layout_map, keras.distribution.LayoutMap):
        raise ValueError(
            "`layout_map` must be a `keras.distribution.LayoutMap`. "
            f"Received: layout_map of type {type(layout_map).__name__}"
        )
    mesh = layout_map.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    keys = list(layout_map)
    for variable in model.weights:
        path, shape = variable.path, tuple(variable.shape)
        # Keras looks up an exact key, then `re.fullmatch` of every key.
        matched = [k for k in keys if k == path or re.fullmatch(k, path)]
        if len(matched) > 1:
            raise ValueError(
                f"The weight `{path}` matches {len(matched)} keys of the "
                f"layout map: {matched}. Each weight may match one key."
            )
        if not matched:
            if (
                min_sharded_size is not None
                and len(shape) >= 2
                and _size(shape) >= min_sharded_size
            ):
                raise ValueError(
                    f"The weight `{path}` of shape {shape} matches no key "
                    "of the layout map, so every device would hold all of "
                    f"it. Keys: {keys}"
                )
            continue
        axes = tuple(layout_map[path].axes)
        if len(axes) != len(shape):
            raise ValueError(
                f"The layout {axes} of `{path}` (key {matched[0]!r}) does "
                f"not fit its shape {shape}."
            )
        for dim, (length, axis) in enumerate(zip(shape, axes)):
            if axis is not None and length % sizes[axis]:
                raise ValueError(
                    f"Cannot shard `{path}` of shape {shape} with layout "
                    f"{axes} on the mesh {sizes}: dimension {dim} "
                    f"({length}) is not divisible by the '{axis}' axis "
                    f"({sizes[axis]}). Use a mesh whose axes divide the "
                    "model's head counts, widths and vocabulary."
                )


def _size(shape):
    size = 1
    for length in shape:
        size *= length
    return size


def _family(backbone):
    """The `keras_mtp.backbones.Family` of a backbone class, name or config."""
    if isinstance(backbone, str):
        return backbones.family(backbone)
    cls = backbone
    if isinstance(backbone, dict):
        try:
            cls = keras.saving.get_registered_object(
                backbone.get("registered_name")
            ) or getattr(keras_hub.models, backbone.get("class_name"), None)
        except (TypeError, AttributeError):
            cls = None
    if isinstance(cls, type):
        matches = [
            f
            for f in backbones.FAMILIES
            if getattr(keras_hub.models, f.backbone, None) is not None
            and issubclass(cls, f.backbone_class)
        ]
        if matches:  # the most derived match first
            return min(matches, key=lambda f: -len(f.backbone_class.__mro__))
    raise ValueError(
        "`backbone` must be a keras-hub backbone class, a family name or a "
        "serialized backbone config of the families "
        f"{sorted(f.backbone for f in backbones.FAMILIES)}. Received: "
        f"backbone={backbone!r}"
    )


@contextlib.contextmanager
def stage_on_host():
    """Weights read from files pass whole through host memory, not a device.

    Keras' `Variable.assign` (which `load_weights`, `load_model` and
    keras-hub's `from_preset` use) makes a value read from a file an array on
    the default device before splitting it into the variable's shards, so
    each weight passes whole through one accelerator. Inside this context,
    on JAX under a distribution whose mesh does not hold the host's CPU
    (accelerators), that array is made in host memory and each accelerator
    receives only its shard. Otherwise (CPU devices, no distribution,
    another backend) it does nothing. `MTPCausalLM.from_preset` loads inside
    it.

    Example:

    ```python
    with distribution.scope(), keras_mtp.distribution.stage_on_host():
        model = keras.saving.load_model("model.keras")
    ```
    """
    distribution = keras.distribution.distribution()
    if keras.config.backend() != "jax" or distribution is None:
        yield
        return
    import jax

    host = jax.local_devices(backend="cpu")[0]
    if host in distribution.device_mesh.backend_mesh.devices.flat:
        yield
        return
    # Arrays made under `default_device` are uncommitted: a value that is
    # not a variable's may still move to the accelerators later.
    with jax.default_device(host):
        yield


def initialize_processes(
    num_processes=None, coordinator_address=None, process_id=None
):
    """Starts multi-host JAX when asked by arguments or the standard variables.

    With `num_processes` (or `KERAS_DISTRIBUTION_NUM_PROCESSES`) above 1,
    calls `keras.distribution.initialize` with the arguments given (None
    lets Keras read `KERAS_DISTRIBUTION_JOB_ADDRESSES` and
    `KERAS_DISTRIBUTION_PROCESS_ID`). CPU processes exchange gradients over
    gloo. Otherwise it does nothing. Call it before anything touches a
    device.

    Args:
        num_processes: int >= 1 or None. The number of processes.
        coordinator_address: str or None. `host:port` of process 0.
        process_id: int >= 0 or None. This process.

    Raises:
        ValueError: for several processes on a backend other than JAX.
    """
    env = os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES")
    total = num_processes or (int(env) if env else 1)
    if total <= 1:
        return
    if keras.config.backend() != "jax":
        raise ValueError(
            "Multi-process training needs the JAX backend. Received: "
            f"KERAS_BACKEND={keras.config.backend()}"
        )
    import jax

    # CPU processes exchange gradients over gloo; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        job_addresses=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


DISTRIBUTIONS = ("none", "data", "model")


def make_distribution(
    distribution, backbone, mtp_num_layers, batch_size, mesh=""
):
    """A `keras.distribution` for an `MTPCausalLM`, or None for one device.

    `"data"`: `DataParallel` over every device. `"model"`: `ModelParallel`
    on a `(batch, model)` mesh with the layout map of `get_layout_map`,
    built from the backbone family and the MTP settings alone (no model is
    built here): build the model inside `distribution.scope()` and each
    weight is created sharded. Each process feeds its own rows of every
    global batch (`keras_mtp.data.make_dataset(..., num_shards,
    shard_index)`), so Keras does not shard the dataset again.

    Args:
        distribution: str. `"none"`, `"data"` or `"model"`.
        backbone: the backbone's family name, class or config (as
            `get_layout_map` takes it).
        mtp_num_layers: int >= 0. The MTP depths D.
        batch_size: int >= 1. The global batch size (all processes).
        mesh: str. `"BATCH,MODEL"` for `"model"`, whose product is the
            number of devices.

    Raises:
        ValueError: naming the value, for a distribution on a backend other
            than JAX, a mesh that does not hold the devices, or a batch
            the devices (or the mesh's batch axis) do not divide.
    """
    check_choice(distribution, "distribution", DISTRIBUTIONS)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if distribution == "none":
        return None
    if keras.config.backend() != "jax":
        raise ValueError(
            f"distribution={distribution!r} needs the JAX backend. "
            f"Received: KERAS_BACKEND={keras.config.backend()}"
        )
    import jax

    devices = keras.distribution.list_devices()
    if distribution == "data":
        if batch_size % len(devices):
            raise ValueError(
                f"distribution='data' splits the batch over all "
                f"{len(devices)} devices: batch_size={batch_size} must be a "
                "multiple of it."
            )
        return keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=False
        )
    shape = _mesh_shape(mesh)
    if len(shape) != 2 or math.prod(shape) != len(devices):
        raise ValueError(
            "distribution='model' needs mesh='BATCH,MODEL' with "
            f"BATCH·MODEL = {len(devices)} devices. Received: mesh={mesh!r}"
        )
    # The batch splits over the batch axis only (the model axis holds
    # copies of each row), and each process holds whole batch shards.
    batch_axis, processes = shape[0], jax.process_count()
    if batch_size % batch_axis or batch_axis % processes:
        raise ValueError(
            "distribution='model' splits the batch over the batch axis of "
            f"mesh={mesh!r} ({batch_axis}), which {processes} process(es) "
            f"share: batch_size={batch_size} must be a multiple of the batch "
            "axis, and the batch axis of the process count."
        )
    device_mesh = keras.distribution.DeviceMesh(
        shape, axis_names=("batch", "model"), devices=devices
    )
    layout_map = get_layout_map(
        device_mesh, backbone, mtp_num_layers=mtp_num_layers
    )
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False
    )


def _mesh_shape(mesh):
    """`"2,4"` -> `(2, 4)`; `()` for text that is not integers."""
    try:
        return tuple(int(n) for n in str(mesh).split(","))
    except ValueError:
        return ()
