"""What MTP needs from a keras-hub backbone, in one place.

For each supported backbone: the shared token embedding (and its scaling), a
blueprint of its last decoder layer, a blueprint of its final norm, and how to
call a decoder layer with a padding mask. Everything family-specific lives here.
"""

import inspect

import keras
import keras_hub
from keras import ops

# Backbones whose token embedding is multiplied by sqrt(hidden_dim) before the
# first decoder layer (Gemma's convention); True means scaled.
_SUPPORTED_BACKBONES = {
    "GPT2Backbone": False,
    "LlamaBackbone": False,  # also Llama3Backbone, a subclass
    "MistralBackbone": False,
    "GemmaBackbone": True,
    "Qwen3Backbone": False,
    "Qwen3MoeBackbone": False,
    "MixtralBackbone": False,
}


def _supported_class(backbone):
    for name, scaled in _SUPPORTED_BACKBONES.items():
        cls = getattr(keras_hub.models, name, None)
        if cls is not None and isinstance(backbone, cls):
            return name, scaled
    return None, None


def check_backbone(backbone):
    """Raises a `ValueError` naming `backbone` if MTP cannot wrap it."""
    name, _ = _supported_class(backbone)
    if name is None:
        raise ValueError(
            "keras_mtp supports the keras-hub causal backbones "
            f"{sorted(_SUPPORTED_BACKBONES)}. Received: backbone of class "
            f"{type(backbone).__name__}"
        )
    embedding = backbone.token_embedding
    if not isinstance(embedding, keras.layers.ReversibleEmbedding):
        raise ValueError(
            "MTP shares the backbone's `token_embedding`, which must be a "
            "`keras.layers.ReversibleEmbedding`. Received: "
            f"{type(embedding).__name__} on {type(backbone).__name__}"
        )


def embedding_scale(backbone):
    """The factor the backbone multiplies token embeddings by, or None."""
    _, scaled = _supported_class(backbone)
    return float(backbone.hidden_dim) ** 0.5 if scaled else None


def layer_norm_epsilon(backbone):
    """The backbone's norm epsilon, reused by the MTP input RMSNorms."""
    return float(getattr(backbone, "layer_norm_epsilon", 1e-6))


def _serialize_argument(name, value):
    if name == "activation" and callable(value):
        return keras.activations.serialize(value)
    if isinstance(value, keras.initializers.Initializer):
        return keras.initializers.serialize(value)
    return value


def layer_config(layer):
    """`layer.get_config()`, repaired where keras-hub's is incomplete.

    keras-hub 0.32 has layers whose config cannot rebuild them:
    `LlamaTransformerDecoder.get_config()` raises `AttributeError`
    (`rope_scaling_factor`), `Qwen3TransformerDecoder` omits `head_dim` and
    `sliding_window_size`, `MixtralTransformerDecoder` omits its router-loss
    arguments, and Gemma's `RMSNormalization` has no `get_config` at all. Each
    constructor argument missing from the config is taken from the attribute
    of the same name, which those layers all store.
    """
    try:
        config = layer.get_config()
    except (AttributeError, NotImplementedError):
        config = {
            "name": layer.name,
            "trainable": layer.trainable,
            "dtype": keras.dtype_policies.serialize(layer.dtype_policy),
        }
    parameters = inspect.signature(type(layer).__init__).parameters
    for name, parameter in parameters.items():
        if name == "self" or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        if name not in config:
            if not hasattr(layer, name):
                raise ValueError(
                    f"Cannot copy {type(layer).__name__}: its config lacks "
                    f"the constructor argument `{name}` and the layer has no "
                    "attribute of that name."
                )
            config[name] = _serialize_argument(name, getattr(layer, name))
    return config


def layer_blueprint(layer):
    """A JSON-able recipe to build a fresh layer of `layer`'s class and config.

    Accepts a layer or an existing blueprint (returned unchanged).
    """
    if isinstance(layer, dict):
        return layer
    if not isinstance(layer, keras.layers.Layer):
        raise ValueError(
            "Expected a keras Layer or a blueprint dict. "
            f"Received: {type(layer).__name__}"
        )
    cls = type(layer)
    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "config": layer_config(layer),
        "registered_name": keras.saving.get_registered_name(cls),
    }


def build_from_blueprint(blueprint, name, dtype):
    """A new, unbuilt layer from `blueprint`, renamed, with `dtype`."""
    dtype = keras.dtype_policies.serialize(keras.dtype_policies.get(dtype))
    config = {**blueprint["config"], "name": name, "dtype": dtype}
    # keras-hub's TransformerDecoder builds itself in `__init__` when its
    # config carries input shapes, which would create its weights outside the
    # caller's name scope (unprefixed, identical paths for every depth). The
    # caller builds it in `build()` instead.
    for key in ("decoder_sequence_shape", "encoder_sequence_shape"):
        if key in config:
            config[key] = None
    return keras.saving.deserialize_keras_object(
        {**blueprint, "config": config}
    )


def decoder_blueprint(backbone):
    """Blueprint of the backbone's last decoder layer (MoE stays MoE)."""
    return layer_blueprint(backbone.transformer_layers[-1])


def final_norm_blueprint(backbone):
    """Blueprint of the backbone's final norm (the type of `Norm_k`)."""
    return layer_blueprint(backbone.layer_norm)


def call_decoder(block, x, padding_mask, training=None):
    """Runs one keras-hub decoder layer causally over `x` with `padding_mask`.

    keras-hub decoders name the mask `decoder_padding_mask` (GPT-2, Llama,
    Qwen, Mixtral) or `padding_mask` (Gemma), and some return a tuple.
    """
    parameters = inspect.signature(block.call).parameters
    kwargs = {}
    if "training" in parameters:
        kwargs["training"] = training
    if "decoder_padding_mask" in parameters:
        kwargs["decoder_padding_mask"] = padding_mask
    elif "padding_mask" in parameters:
        kwargs["padding_mask"] = padding_mask
    else:
        raise ValueError(
            f"Cannot pass a padding mask to {type(block).__name__}: its "
            f"`call` takes {list(parameters)}"
        )
    outputs = block(x, **kwargs)
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def call_decoder_with_cache(block, x, cache, cache_update_index):
    """Runs one keras-hub decoder layer over `x` at positions
    `cache_update_index ...` against its key/value `cache`; returns
    `(outputs, cache)`. The keyword names differ by family (Gemma: `cache`;
    the others: `self_attention_cache`)."""
    parameters = inspect.signature(block.call).parameters
    if "self_attention_cache" in parameters:
        outputs = block(
            x,
            self_attention_cache=cache,
            self_attention_cache_update_index=cache_update_index,
        )
    elif "cache" in parameters:
        outputs = block(x, cache=cache, cache_update_index=cache_update_index)
    else:
        raise ValueError(
            f"{type(block).__name__} takes no key/value cache: its `call` "
            f"takes {list(parameters)}"
        )
    return outputs[0], outputs[1]


def causal_lm(backbone):
    """keras-hub's `CausalLM` task for `backbone` (no preprocessor): its
    `call_with_cache` and `generate` run the main model with a KV cache."""
    name, _ = _supported_class(backbone)
    # The most derived class first (`Llama3Backbone` -> `Llama3CausalLM`).
    for cls in type(backbone).__mro__:
        task = getattr(
            keras_hub.models, cls.__name__.replace("Backbone", "CausalLM"), None
        )
        if task is not None and cls.__name__.endswith("Backbone"):
            return task(backbone=backbone, preprocessor=None)
    raise ValueError(f"No keras-hub CausalLM for {name}")


def embed(token_embedding, token_ids, scale=None, detach=False):
    """`Emb(token_ids)` with the backbone's scaling; no position embedding."""
    table = token_embedding.embeddings
    if detach:
        table = ops.stop_gradient(table)
    x = ops.take(table, ops.cast(token_ids, "int32"), axis=0)
    x = ops.cast(x, token_embedding.compute_dtype)
    if scale is not None:
        x = x * ops.cast(scale, x.dtype)
    return x


def head_kernel(token_embedding, detach=False):
    """The output head's kernel as stored: the `(V, d)` embedding table when
    tied, the `(d, V)` reverse embeddings when not; `apply_head` reads
    either without transposing (no `(d, V)` copy, nor one of its gradient).
    """
    if token_embedding.tie_weights:
        kernel = token_embedding.embeddings
    else:
        kernel = token_embedding.reverse_embeddings
    # A tensor, not the variable (`convert_to_tensor` returns TF's variable
    # itself): rematerialized functions take the kernel as an argument, and
    # TF's `recompute_grad` would count a variable twice.
    kernel = ops.copy(kernel)
    return ops.stop_gradient(kernel) if detach else kernel


def apply_head(token_embedding, hidden_states, kernel):
    """Logits of `hidden_states` through `kernel`, as the embedding reversed
    computes them (its `reverse_dtype` and `logit_soft_cap`)."""
    dtype = token_embedding.reverse_dtype or hidden_states.dtype
    hidden_states = ops.cast(hidden_states, dtype)
    kernel = ops.cast(kernel, dtype)
    if token_embedding.tie_weights:  # kernel (V, d)
        logits = ops.einsum("...d,vd->...v", hidden_states, kernel)
    else:  # kernel (d, V)
        logits = ops.matmul(hidden_states, kernel)
    cap = token_embedding.logit_soft_cap
    if cap is not None:
        logits = ops.tanh(logits / cap) * cap
    return logits
