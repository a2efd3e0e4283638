"""The trained MTP layer of Hugging Face Qwen3.5 checkpoints, in and out.

The Qwen3.5 checkpoints (dense and MoE) ship one Multi-Token Prediction
layer as `mtp.*` tensors beside the main model's, which transformers and
keras-hub's converters skip. Layout reference: vLLM's
`vllm/model_executor/models/qwen3_5_mtp.py` (`Qwen3_5MultiTokenPredictor`,
whose loader renames `mtp.` to `model.`). Its forward, at position `i`:

```
e = embed_tokens(x[i + 1])                  # the main model's, shared
u = fc(cat([pre_fc_norm_embedding(e), pre_fc_norm_hidden(h_i)]))
h = layers[0](u)                            # a "full_attention" layer
logits = lm_head(norm(h))                   # the main model's head
```

is `MTPLayer` depth 1 (`embedding_norm`, `hidden_norm`, `projection`,
`transformer_block`, `output_norm`). All four norms are `Qwen3_5RMSNorm`,
`rms(x) * (1 + w)` (vLLM's `qwen3_5.py` imports `GemmaRMSNorm as
Qwen3_5RMSNorm`; transformers' `Qwen3_5RMSNorm.forward` computes
`output * (1.0 + self.weight.float())`): `output_norm` and the block's norms
are keras-hub's `Qwen3_5LayerNorm`, which computes `x * (1 + scale)` too, so
their weights copy unchanged, as keras-hub's converter copies them; the two
input norms are Keras `RMSNormalization` (`x * scale`), so `scale = 1 + w`.

`MTP_TENSORS` below is the whole mapping: HF key below `mtp.`, the Keras
variable's attribute path below `MTPLayer`, and the transform (`linear`:
torch `(out, in)` to Keras `(in, out)`; `heads_in`/`heads_out`: the same,
then reshaped to the `EinsumDense` kernel, as keras-hub's converter does;
`experts`: `(E, a, b)` to `(E, b, a)`). The MoE experts are read fused
(`experts.gate_up_proj` `(E, 2I, d)`, gate rows first, and
`experts.down_proj` `(E, d, I)`, transformers' layout) or per expert
(`experts.{j}.{gate,up,down}_proj.weight`), as keras-hub's converter accepts
both.

Files: `load_hf_mtp_weights` reads the `mtp.*` tensors that
`model.safetensors.index.json` lists (only their shards), or without an
index those of the first of `model.safetensors` and `mtp.safetensors` that
has any, through keras-hub's `get_file` (local directories, `hf://`).
`save_hf_mtp_weights` writes them next to an HF export (keras-hub's
`export_to_transformers` exists for `Qwen3_5Backbone`, not
`Qwen3_5MoeBackbone`): into its `model.safetensors`, or into a new
`mtp.safetensors` shard listed in its `model.safetensors.index.json`; into
a standalone `mtp.safetensors` (the same `mtp.*` names, shapes and dtypes
as in the checkpoint) when the directory holds neither.

Round trip: every transform is exact except `1 + w`: exact whenever the
variable's dtype holds `1 + w` exactly (for bfloat16 `w` into float32
variables: `w == 0` or `2**-16 <= |w| < 1`), else off by at most half an ulp
of `1 + w` (`2**-24` in float32). Variables
stored in bfloat16 keep `1 + w` to 8 bits: load into a float32 or
mixed-precision model.
"""

import contextlib
import json
import math
import os
import struct
import typing

import keras
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" for safetensors)
import numpy as np

from keras_mtp import backbones

MTP_PREFIX = "mtp."
MTP_FILE = "mtp.safetensors"
# keras_mtp family -> the HF `model_type`s of its checkpoints.
_FAMILIES = {
    "qwen3_5": ("qwen3_5", "qwen3_5_text"),
    "qwen3_5_moe": ("qwen3_5_moe", "qwen3_5_moe_text"),
}


class Transform(typing.NamedTuple):
    name: str
    to_keras: typing.Callable  # (HF array, Keras shape) -> Keras array
    to_hf: typing.Callable  # Keras array -> HF array
    hf_shape: typing.Callable  # Keras shape -> HF shape


COPY = Transform("copy", lambda w, s: w, lambda k: k, tuple)
ONE_PLUS = Transform("1 + w", lambda w, s: 1.0 + w, lambda k: k - 1.0, tuple)
LINEAR = Transform(
    "linear", lambda w, s: w.T, lambda k: k.T, lambda s: tuple(s[::-1])
)
HEADS_IN = Transform(  # (H * h, d) <-> (d, H, h)
    "heads_in",
    lambda w, s: w.T.reshape(s),
    lambda k: k.reshape(k.shape[0], -1).T,
    lambda s: (math.prod(s[1:]), s[0]),
)
HEADS_OUT = Transform(  # (d, H * h) <-> (H, h, d)
    "heads_out",
    lambda w, s: w.T.reshape(s),
    lambda k: k.reshape(-1, k.shape[-1]).T,
    lambda s: (s[-1], math.prod(s[:-1])),
)
EXPERTS = Transform(
    "experts",
    lambda w, s: w.transpose(0, 2, 1),
    lambda k: k.transpose(0, 2, 1),
    lambda s: (s[0], s[2], s[1]),
)

_BLOCK = "transformer_block."
_ATTENTION = _BLOCK + "_self_attention_layer."
_MOE = _BLOCK + "mlp."
# (HF key below `mtp.`, attribute path below `MTPLayer`, transform, MLP kind:
# None for both families, "dense" or "moe").
MTP_TENSORS = (
    ("fc.weight", "projection.kernel", LINEAR, None),
    ("pre_fc_norm_embedding.weight", "embedding_norm.scale", ONE_PLUS, None),
    ("pre_fc_norm_hidden.weight", "hidden_norm.scale", ONE_PLUS, None),
    ("norm.weight", "output_norm.scale", COPY, None),
    (
        "layers.0.input_layernorm.weight",
        _BLOCK + "_input_layernorm.scale",
        COPY,
        None,
    ),
    (
        "layers.0.post_attention_layernorm.weight",
        _BLOCK + "_post_attention_layernorm.scale",
        COPY,
        None,
    ),
    (
        "layers.0.self_attn.q_proj.weight",
        _ATTENTION + "_query_dense.kernel",
        HEADS_IN,
        None,
    ),
    (
        "layers.0.self_attn.k_proj.weight",
        _ATTENTION + "_key_dense.kernel",
        HEADS_IN,
        None,
    ),
    (
        "layers.0.self_attn.v_proj.weight",
        _ATTENTION + "_value_dense.kernel",
        HEADS_IN,
        None,
    ),
    (
        "layers.0.self_attn.o_proj.weight",
        _ATTENTION + "_output_dense.kernel",
        HEADS_OUT,
        None,
    ),
    (
        "layers.0.self_attn.q_norm.weight",
        _ATTENTION + "_query_norm.scale",
        COPY,
        None,
    ),
    (
        "layers.0.self_attn.k_norm.weight",
        _ATTENTION + "_key_norm.scale",
        COPY,
        None,
    ),
    (
        "layers.0.mlp.gate_proj.weight",
        _BLOCK + "_feedforward_gate_dense.kernel",
        LINEAR,
        "dense",
    ),
    (
        "layers.0.mlp.up_proj.weight",
        _BLOCK + "_feedforward_intermediate_dense.kernel",
        LINEAR,
        "dense",
    ),
    (
        "layers.0.mlp.down_proj.weight",
        _BLOCK + "_feedforward_output_dense.kernel",
        LINEAR,
        "dense",
    ),
    ("layers.0.mlp.gate.weight", _MOE + "_router_gate.kernel", LINEAR, "moe"),
    (
        "layers.0.mlp.experts.gate_up_proj",
        _MOE + "expert_bank._expert_feedforward_gate_dense",
        EXPERTS,
        "moe",
    ),
    (
        "layers.0.mlp.experts.down_proj",
        _MOE + "expert_bank._expert_feedforward_output_dense",
        EXPERTS,
        "moe",
    ),
    (
        "layers.0.mlp.shared_expert.gate_proj.weight",
        _MOE + "shared_expert._feedforward_gate_dense.kernel",
        LINEAR,
        "moe",
    ),
    (
        "layers.0.mlp.shared_expert.up_proj.weight",
        _MOE + "shared_expert._feedforward_intermediate_dense.kernel",
        LINEAR,
        "moe",
    ),
    (
        "layers.0.mlp.shared_expert.down_proj.weight",
        _MOE + "shared_expert._feedforward_output_dense.kernel",
        LINEAR,
        "moe",
    ),
    (
        "layers.0.mlp.shared_expert_gate.weight",
        _MOE + "_shared_expert_gate.kernel",
        LINEAR,
        "moe",
    ),
)


def hf_mtp_variables(model):
    """`[(HF key, Keras variable, Transform)]` of `model`'s MTP depth 1.

    Raises a `ValueError` unless `model.backbone` is a Qwen3.5 backbone
    (dense or MoE) and `model` has an MTP depth with a full-attention
    block."""
    try:
        name = backbones.family(model.backbone).name
    except ValueError:
        name = None
    if name not in _FAMILIES:
        raise ValueError(
            "Hugging Face MTP weights exist for the Qwen3.5 families "
            f"{sorted(_FAMILIES)} (Qwen3_5Backbone, Qwen3_5MoeBackbone). "
            f"Received: {type(model.backbone).__name__} (family {name!r})"
        )
    if model.mtp_block is None:
        raise ValueError("The model has no MTP depth (`mtp_num_layers=0`).")
    layer = model.mtp_block.mtp_layers[0]
    layer_type = getattr(layer.transformer_block, "layer_type", None)
    if layer_type != "full_attention":
        raise ValueError(
            "The HF MTP layer is a full-attention layer. Received a "
            f"{layer_type!r} MTP block."
        )
    kind = "moe" if name == "qwen3_5_moe" else "dense"
    rows = []
    for key, path, transform, mlp in MTP_TENSORS:
        if mlp in (None, kind):
            variable = layer
            for attribute in path.split("."):
                variable = getattr(variable, attribute)
            rows.append((MTP_PREFIX + key, variable, transform))
    return rows


def _first_with_mtp(preset):
    """`{mtp key: file name}` of the first of the index, `model.safetensors`
    and `mtp.safetensors` of `preset` holding `mtp.*` tensors, or `{}`."""
    from keras_hub.src.utils import preset_utils as pu
    from safetensors import safe_open

    preset = os.fspath(preset)
    if pu.check_file_exists(preset, pu.SAFETENSOR_CONFIG_FILE):
        index = pu.load_json(preset, pu.SAFETENSOR_CONFIG_FILE)
        return {
            k: f
            for k, f in index["weight_map"].items()
            if k.startswith(MTP_PREFIX)
        }
    for name in (pu.SAFETENSOR_FILE, MTP_FILE):
        if pu.check_file_exists(preset, name):
            with safe_open(pu.get_file(preset, name), "np") as f:
                keys = [k for k in f.keys() if k.startswith(MTP_PREFIX)]
            if keys:
                return dict.fromkeys(keys, name)
    return {}


def takes_hf_mtp(backbone):
    """Whether `backbone`'s family ships `mtp.*` tensors (Qwen3.5)."""
    return backbones.family(backbone).name in _FAMILIES


def has_hf_mtp(preset):
    """Whether the HF checkpoint `preset` (a directory or `hf://` handle)
    has `mtp.*` tensors (downloads its index, or its single file)."""
    return bool(_first_with_mtp(preset))


def _check_config(preset, backbone):
    from keras_hub.src.utils import preset_utils as pu

    if not pu.check_file_exists(preset, pu.CONFIG_FILE):
        return
    config = pu.load_json(preset, pu.CONFIG_FILE)
    model_type = config.get("model_type")
    name = backbones.family(backbone).name
    if model_type is not None and model_type not in _FAMILIES[name]:
        raise ValueError(
            f"{preset!r} is a `model_type={model_type!r}` checkpoint; the "
            f"model's backbone is {type(backbone).__name__} ({name!r})."
        )
    if config.get("text_config", config).get("mtp_use_dedicated_embeddings"):
        raise ValueError(
            f"{preset!r} has dedicated MTP embeddings "
            "(`mtp_use_dedicated_embeddings`); keras_mtp's MTP shares the "
            "backbone's."
        )


def _per_expert_keys(key, num_experts):
    """The per-expert keys a fused `experts.*` key stands for."""
    stem, fused = key.rsplit(".", 1)
    names = ("gate_proj", "up_proj") if fused == "gate_up_proj" else (fused,)
    return [
        [f"{stem}.{j}.{n}.weight" for n in names] for j in range(num_experts)
    ]


def load_hf_mtp_weights(model, preset):
    """Loads the `mtp.*` tensors of the Hugging Face Qwen3.5 checkpoint
    `preset` into MTP depth 1 of `model` (an `MTPCausalLM`).

    Returns the number of depths loaded: 1, or 0 (nothing changed) if the
    checkpoint has no `mtp.*` tensor. Raises a `ValueError` naming the key
    for a missing tensor (one the model needs, or one the index lists in a
    shard that does not hold it), a shape mismatch or an `mtp.*` tensor it
    does not know (before assigning anything), and for a non-Qwen3.5
    backbone.
    """
    from keras_hub.src.utils import preset_utils as pu
    from safetensors import safe_open

    rows = hf_mtp_variables(model)
    preset = os.fspath(preset)
    files = _first_with_mtp(preset)
    if not files:
        return 0
    _check_config(preset, model.backbone)
    with contextlib.ExitStack() as stack:
        handles = {
            name: stack.enter_context(
                safe_open(pu.get_file(preset, name), "np")
            )
            for name in sorted(set(files.values()))
        }
        # What an index claims, against what its shards hold.
        for name, handle in handles.items():
            held = set(handle.keys())
            for key in sorted(k for k, f in files.items() if f == name):
                if key not in held:
                    raise ValueError(
                        f"The index of {preset!r} lists `{key}` in {name}, "
                        "which holds no such tensor."
                    )

        def shape(key):
            return tuple(handles[files[key]].get_slice(key).get_shape())

        def read(key):
            return handles[files[key]].get_tensor(key).astype("float32")

        # Check every key and shape first, then assign.
        plan, used = [], set()
        for key, variable, transform in rows:
            expected = tuple(transform.hf_shape(tuple(variable.shape)))
            sources = [[key]]  # per expert: the keys to concatenate
            shapes = [expected]
            if key not in files and transform is EXPERTS:
                sources = _per_expert_keys(key, expected[0])
                parts = len(sources[0])  # gate and up, or down
                shapes = [(expected[1] // parts, expected[2])] * parts
            for k, s in ((k, s) for ks in sources for k, s in zip(ks, shapes)):
                if k not in files:
                    either = "" if k == key else f" (nor `{key}`)"
                    raise ValueError(
                        f"The checkpoint {preset!r} has no tensor `{k}`"
                        f"{either} for `{variable.path}`."
                    )
                if shape(k) != s:
                    raise ValueError(
                        f"`{k}` in {preset!r} has shape {shape(k)}; "
                        f"`{variable.path}` {tuple(variable.shape)} needs "
                        f"{s} ({transform.name})."
                    )
                used.add(k)
            plan.append((variable, transform, sources, key in files))
        unknown = sorted(set(files) - used)
        if unknown:
            raise ValueError(
                f"{preset!r} has `mtp.*` tensors with no place in MTP depth "
                f"1: {unknown}"
            )
        for variable, transform, sources, direct in plan:
            if direct:
                hf = read(sources[0][0])
            else:  # (E, 2I, d) from gate and up rows, or (E, d, I)
                hf = np.stack(
                    [np.concatenate([read(k) for k in ks]) for ks in sources]
                )
            variable.assign(transform.to_keras(hf, tuple(variable.shape)))
    return 1


def _tensor_bytes(path):
    """`{key: bytes}` of a safetensors file, from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    return {
        k: v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
    }


def save_hf_mtp_weights(model, directory, dtype=None, per_expert=False):
    """Writes MTP depth 1 of `model` as the `mtp.*` tensors of a Hugging
    Face Qwen3.5 checkpoint in `directory`; returns the file written.

    With `model.safetensors.index.json` there (a sharded export), they go to
    a new `mtp.safetensors` shard the index lists (any earlier `mtp.*`
    entries dropped); else into `model.safetensors` if there is one (e.g.
    `backbone.export_to_transformers(directory)`, replacing any `mtp.*`
    tensors); else into a standalone `mtp.safetensors`.

    Args:
        model: an `MTPCausalLM` over a Qwen3.5 backbone (dense or MoE).
        directory: str, created if missing.
        dtype: dtype of the written tensors; default each variable's.
        per_expert: bool. MoE: write `experts.{j}.{gate,up,down}_proj.weight`
            instead of the fused `experts.gate_up_proj` / `down_proj`.
    """
    from keras_hub.src.utils import preset_utils as pu
    from safetensors import safe_open
    from safetensors.numpy import save_file

    tensors = {}
    for key, variable, transform in hf_mtp_variables(model):
        value = keras.ops.convert_to_numpy(variable).astype("float32")
        hf = transform.to_hf(value).astype(dtype or variable.dtype)
        if transform is EXPERTS and per_expert:
            for j, keys in enumerate(_per_expert_keys(key, len(hf))):
                for k, part in zip(keys, np.split(hf[j], len(keys))):
                    tensors[k] = part
        else:
            tensors[key] = hf
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata = {"format": "pt"}
    os.makedirs(directory, exist_ok=True)
    index_path = os.path.join(directory, pu.SAFETENSOR_CONFIG_FILE)
    model_path = os.path.join(directory, pu.SAFETENSOR_FILE)
    mtp_path = os.path.join(directory, MTP_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        stale = {
            k: f for k, f in weight_map.items() if k.startswith(MTP_PREFIX)
        }
        if any(f == MTP_FILE and k not in stale for k, f in weight_map.items()):
            raise ValueError(f"{index_path} has non-MTP tensors in {MTP_FILE}")
        if "total_size" in index.get("metadata", {}):
            sizes = {
                name: _tensor_bytes(os.path.join(directory, name))
                for name in set(stale.values())
            }
            freed = sum(sizes[name][k] for k, name in stale.items())
            added = sum(v.nbytes for v in tensors.values())
            index["metadata"]["total_size"] += added - freed
        weight_map = {k: f for k, f in weight_map.items() if k not in stale}
        index["weight_map"] = {**weight_map, **dict.fromkeys(tensors, MTP_FILE)}
        save_file(tensors, mtp_path, metadata=metadata)
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
        return mtp_path
    if os.path.exists(model_path):
        with safe_open(model_path, "np") as f:
            metadata = f.metadata() or metadata
            main = {
                k: f.get_tensor(k)
                for k in f.keys()
                if not k.startswith(MTP_PREFIX)
            }
        save_file({**main, **tensors}, model_path, metadata=metadata)
        return model_path
    save_file(tensors, mtp_path, metadata=metadata)
    return mtp_path
