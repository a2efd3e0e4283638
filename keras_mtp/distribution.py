"""Layout maps that place the weights of an `MTPCausalLM` on a device mesh.

`get_layout_map` returns a `keras.distribution.LayoutMap` for
`keras.distribution.ModelParallel` (JAX backend): keras-hub's own map for the
backbone where the backbone class has one, our rules where it has none, and
rules for what keras-hub leaves replicated (the untied output head, MoE
experts) and for the MTP depths.

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

import re

import keras

from keras_mtp import backbones
from keras_mtp.mtp_causal_lm import MTPCausalLM

# The mesh-axis placeholders of the rules in `keras_mtp.backbones.FAMILIES`.
_MODEL = backbones.MODEL
_DATA = backbones.DATA

# The MTP weights carry the names `MTPLayer` gives its sublayers, after any
# prefix (`mtp_block/mtp_layer_1/`): keys start with `.*`, and no backbone
# weight has a `transformer_block/` or `mtp_layer_k/` component.
_MTP_BLOCK_PREFIX = r".*transformer_block/"
_MTP_RULES = ((r".*mtp_layer_\d+/projection/kernel", (_DATA, _MODEL)),)


def get_layout_map(
    model,
    device_mesh,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
):
    """A `keras.distribution.LayoutMap` for an `MTPCausalLM`.

    The map shards the backbone, its output head and every MTP depth (the
    projection `W_k` and the transformer block) over `device_mesh`, for
    `keras.distribution.ModelParallel` on the JAX backend:

    - the backbone: keras-hub's own `backbone.get_layout_map(...)` where the
      backbone class has one (Llama, Gemma, Qwen, Qwen-MoE, Qwen3-MoE),
      completed or replaced by the same layouts written for each family's
      weight names (`Family.layout` in `keras_mtp.backbones.FAMILIES`).
      GPT-2's vocabulary (50257) divides no mesh axis, so its token and
      position embeddings (and OPT's) shard the hidden dimension on the
      model axis.
    - what keras-hub leaves replicated: the untied output head
      (`token_embedding/reverse_embeddings`, vocabulary on the model axis) and
      the MoE experts (expert dimension on the model axis).
    - each MTP depth: `projection/kernel` `(2d, d)` as `(batch, model)` and
      its transformer block with the layouts of the backbone's decoder layers.

    Norm scales, biases, MoE routers and the MTP loss weights are replicated.
    The keys are regular expressions over `variable.path`; no variable path
    matches two keys (keras raises on that), and the MTP keys start with `.*`,
    so the map holds for a new model of the same configuration, whatever
    prefix or counter its MTP weights get. Build that model inside
    `distribution.scope()`: a variable takes its layout when it is created.

    Args:
        model: `keras_mtp.MTPCausalLM`. The model to shard, or one of the
            same configuration; its variable shapes are checked against the
            mesh.
        device_mesh: `keras.distribution.DeviceMesh`. The mesh to shard on.
        model_parallel_dim_name: str. The mesh axis that shards the weights
            (tensor, vocabulary and expert parallelism).
        data_parallel_dim_name: str. The mesh axis that shards the batch;
            the weights are also split along it (FSDP-style), as keras-hub's
            maps do.

    Returns:
        `keras.distribution.LayoutMap` on `device_mesh`.

    Raises:
        ValueError: if `model` is not an `MTPCausalLM`, `device_mesh` is not
            a `DeviceMesh`, an axis name is not one of the mesh's, the two
            names are equal, or a sharded dimension of a weight is not
            divisible by the size of its mesh axis (JAX would refuse it).

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
    from keras_mtp.distribution import get_layout_map

    mesh = keras.distribution.DeviceMesh(
        shape=(2, 4),
        axis_names=("batch", "model"),
        devices=keras.distribution.list_devices(),
    )
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=256, num_layers=2, num_query_heads=8,
        num_key_value_heads=4, hidden_dim=64, intermediate_dim=128)
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=1)
    layout_map = get_layout_map(model, mesh)

    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        model = keras_mtp.MTPCausalLM.from_config(model.get_config())
        model.compile(optimizer="adam")
        x = {"token_ids": np.ones((8, 16), "int32"),
             "padding_mask": np.ones((8, 16), "int32")}
        model.fit(x, np.ones((8, 16), "int32"), batch_size=8)

    kernel = model.mtp_block.mtp_layers[0].projection.kernel
    print(kernel.path, kernel.value.sharding.spec)
    # mtp_block/mtp_layer_1/projection/kernel P('batch', 'model')
    ```
    """
    if not isinstance(model, MTPCausalLM):
        raise ValueError(
            "`model` must be a `keras_mtp.MTPCausalLM`. Received: model of "
            f"type {type(model).__name__}"
        )
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a `keras.distribution.DeviceMesh`. "
            f"Received: device_mesh of type {type(device_mesh).__name__}"
        )
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

    backbone = model.backbone
    rules = _family(backbone).layout
    prefix, decoder_rules = rules.decoder_prefix, rules.decoder_rules
    paths = [v.path for v in model.weights]

    # === Backbone ===
    if hasattr(backbone, "get_layout_map"):
        layout_map = backbone.get_layout_map(
            device_mesh,
            model_parallel_dim_name=model_parallel_dim_name,
            data_parallel_dim_name=data_parallel_dim_name,
        )
    else:
        layout_map = keras.distribution.LayoutMap(device_mesh)
    embedding_rules = rules.embedding_rules + rules.extra_rules
    # Our rules only fill what keras-hub's map leaves out.
    for key, layout in embedding_rules:
        _add_if_uncovered(layout_map, key, resolve(layout), paths)
    for key, layout in decoder_rules:
        _add_if_uncovered(layout_map, prefix + key, resolve(layout), paths)

    # === MTP depths ===
    for key, layout in decoder_rules:
        _add_if_uncovered(
            layout_map, _MTP_BLOCK_PREFIX + key, resolve(layout), paths
        )
    for key, layout in _MTP_RULES:
        _add_if_uncovered(layout_map, key, resolve(layout), paths)

    _check_divisible(model, layout_map, device_mesh)
    return layout_map


def _family(backbone):
    """The backbone's `keras_mtp.backbones.Family` (its layout rules)."""
    try:
        return backbones.family(backbone)
    except ValueError:
        raise ValueError(
            "No layout rules for backbones of class "
            f"{type(backbone).__name__}. Supported: "
            f"{sorted(f.backbone for f in backbones.FAMILIES)}"
        ) from None


def _add_if_uncovered(layout_map, key, layout, paths):
    """Adds `key` if it matches a variable and none it matches has a layout.

    Keys that match nothing are left out; so are keys for variables that the
    backbone's own map (keras-hub's) already places, so its layouts win and
    no path ends up matching two keys.
    """
    matched = [path for path in paths if re.fullmatch(key, path)]
    if not matched:
        return
    if any(layout_map.get(path) is not None for path in matched):
        return
    layout_map[key] = layout


def _check_divisible(model, layout_map, device_mesh):
    """Raises a `ValueError` naming the first weight JAX could not shard."""
    sizes = dict(zip(device_mesh.axis_names, device_mesh.shape))
    for variable in model.weights:
        layout = layout_map[variable.path]  # keras' lookup; raises if ambiguous
        if layout is None:
            continue
        shape = tuple(variable.shape)
        axes = tuple(layout.axes)
        if len(axes) != len(shape):
            raise ValueError(
                f"The layout {axes} of `{variable.path}` does not fit its "
                f"shape {shape}."
            )
        for dim, (length, axis) in enumerate(zip(shape, axes)):
            if axis is not None and length % sizes[axis]:
                raise ValueError(
                    f"Cannot shard `{variable.path}` of shape {shape} with "
                    f"layout {axes} on the mesh {sizes}: dimension {dim} "
                    f"({length}) is not divisible by the '{axis}' axis "
                    f"({sizes[axis]}). Use a mesh whose axes divide the "
                    "model's head counts, widths and vocabulary."
                )
