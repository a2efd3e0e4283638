"""What MTP needs from a keras-hub backbone, in one place.

`FAMILIES` is the one registry of everything family-specific: for each
supported keras-hub decoder-only text family, which backbone class it is, how
its token embedding is scaled, which decoder layer an MTP block copies (and
how that layer's config becomes the full-attention variant), its final norm,
how its decoder layers take a padding mask and a key/value cache, how
packed rows keep documents apart (attention mask, positions), how its
keras-hub `CausalLM` builds and updates its cache, its layout rules for
`keras_mtp.distribution`, a tiny test config and the `train.py` config.
`keras_mtp`, `train.py` and the tests read this table; adding a family is one
`Family` entry here (and its test, which `tests/conftest.py` picks up).

`UNSUPPORTED` names the keras-hub causal LMs left out, with the reason.
"""

import contextlib
import dataclasses
import inspect
import typing

import keras
import keras_hub
from keras import ops

# Placeholders for the mesh axis names in the layout rules below
# (`keras_mtp.distribution` replaces them with the mesh's axis names).
MODEL = "<model>"
DATA = "<batch>"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a family's weights go on a `(batch, model)` device mesh.

    Rules are `(path regex, layout)` pairs, written with `[^/]` and explicit
    separators so that no rule matches the weights of another.

    Attributes:
        decoder_prefix: regex of a backbone decoder layer's path prefix.
        decoder_rules: rules relative to a decoder layer (for the backbone's
            layers after `decoder_prefix`, for each MTP block after
            `.*transformer_block/`).
        embedding_rules: rules for the embeddings, absolute paths.
        extra_rules: other absolute rules (weights keras-hub creates outside
            any name scope).
    """

    decoder_prefix: str = r"transformer_layer_\d+/"
    decoder_rules: tuple = ()
    embedding_rules: tuple = (
        (r"token_embedding/embeddings", (MODEL, DATA)),
        (r"token_embedding/reverse_embeddings", (DATA, MODEL)),
    )
    extra_rules: tuple = ()


@dataclasses.dataclass(frozen=True)
class Family:
    """One keras-hub decoder-only text family.

    Attributes:
        name: the family's name in `train.py --backbone` and the tests.
        backbone: the `keras_hub.models` backbone class name (subclasses, e.g.
            `Llama3Backbone`, belong to the family too).
        decoders: class names of the family's decoder layers (to find the
            call forms of an MTP block from its class).
        tiny: constructor arguments of a tiny test backbone (vocabulary size
            excluded): width 16, a few layers, every layer kind the MTP block
            may copy.
        train: `(d, layers, heads, ffw, sequence_length) -> constructor
            arguments` of `train.py`'s backbone (vocabulary size excluded).
        embedding_scale: the backbone multiplies token embeddings by
            `sqrt(hidden_dim)` (Gemma's convention).
        final_norm: attribute of the backbone's final norm.
        full_attention: `layer -> bool`, for families whose layers differ in
            attention (sliding window, linear attention): True for the
            full-attention (global) layers. None: all layers attend alike.
        moe: `layer -> bool`, for MoE families with dense layers too: True
            for the MoE layers.
        block_config: `(config, backbone) -> config`, the config of the MTP
            block made from the copied layer's: the full-attention variant
            when the backbone has no full-attention layer, without what a
            standalone block cannot take (e.g. Gemma4's KV sharing).
        mask_kwarg: the decoder layer's padding-mask keyword.
        cache_kwargs: the decoder layer's `(cache, cache index)` keywords.
        cache_layout: the keras-hub task's cache: "stacked" (one tensor, the
            layer on axis 1), "per_layer" (a tuple of `(key, value)`) or
            "hybrid" (Qwen3.5: `(key/value, conv, recurrent)` caches, each
            stacked).
        task_masks: the task's `_build_cache` takes the prompt's padding mask
            and `call_with_cache` a `cache_update_mask` (Gemma3, Gemma4).
        recurrent: some decoder layers carry a recurrent state (Qwen3.5's
            Gated DeltaNet). Speculative verification then runs those layers
            token by token and keeps the state after each token, see
            `keras_mtp.speculative`.
        keras_hub_generate: why keras-hub's own `generate` is not this
            model's greedy decoding, or None when it is.
        learned_positions: the backbone has a learned position embedding
            (`max_sequence_length` bounds speculative decoding).
        attention_mask_kwarg: the decoder layer's keyword for a full
            `(B, T, T)` attention mask, which the layer ANDs with its causal
            and padding masks (packed rows, `call_backbone`). None where the
            layer takes none.
        attention_mask_method: where `attention_mask_kwarg` is None, the
            decoder layer's method that computes its attention mask (Gemma's
            `_compute_attention_mask`); packed rows AND theirs into its
            result.
        position_layer: the backbone's layer of learned absolute positions
            whose `call` takes `positions=` (GPT-2's `position_embedding`,
            OPT's `embeddings`): packed rows give it positions restarting
            at each document's first token. None: the positions are
            relative (RoPE, ALiBi), so a document attends alike wherever it
            starts in its row, or the backbone takes `position_ids`
            (Gemma4), which `call_backbone` restarts.
        no_packing: why packed rows cannot be kept apart in this family
            (`call_backbone` raises it), or None.
        layout: the family's `Layout`.
        skip_backends: `{backend: reason}` where keras-hub's family cannot
            run (none in keras-hub 0.32).
        scoped_paths: False where keras-hub creates weights outside its
            layers' name scopes, so their paths lack the usual prefixes.
    """

    name: str
    backbone: str
    decoders: tuple
    tiny: dict
    train: typing.Callable
    embedding_scale: bool = False
    final_norm: str = "layer_norm"
    full_attention: typing.Optional[typing.Callable] = None
    moe: typing.Optional[typing.Callable] = None
    block_config: typing.Optional[typing.Callable] = None
    mask_kwarg: str = "decoder_padding_mask"
    cache_kwargs: tuple = (
        "self_attention_cache",
        "self_attention_cache_update_index",
    )
    cache_layout: str = "stacked"
    task_masks: bool = False
    recurrent: bool = False
    keras_hub_generate: typing.Optional[str] = None
    learned_positions: bool = False
    attention_mask_kwarg: typing.Optional[str] = "decoder_attention_mask"
    attention_mask_method: typing.Optional[str] = None
    position_layer: typing.Optional[str] = None
    no_packing: typing.Optional[str] = None
    layout: Layout = Layout()
    skip_backends: dict = dataclasses.field(default_factory=dict)
    scoped_paths: bool = True

    @property
    def backbone_class(self):
        return getattr(keras_hub.models, self.backbone)


# === Layout rules ============================================================

# Llama names: (d, H, hd) attention kernels, gated feed-forward.
_LLAMA_RULES = (
    (r"self_attention/(query|key|value)/kernel", (MODEL, DATA, None)),
    (r"self_attention/attention_output/kernel", (MODEL, None, DATA)),
    (r"feedforward_(intermediate|gate)_dense/kernel", (DATA, MODEL)),
    (r"feedforward_output_dense/kernel", (MODEL, DATA)),
)
# Qwen3-MoE, Mixtral, Qwen-MoE, Qwen3.5-MoE experts: the expert dimension on
# the model axis (expert parallelism).
_MOE_RULES = (
    (
        r"[^/]*sparse_moe_block[^/]*/experts/"
        r"expert_feedforward_(gate|intermediate)_dense",
        (MODEL, DATA, None),
    ),
    (
        r"[^/]*sparse_moe_block[^/]*/experts/expert_feedforward_output_dense",
        (MODEL, None, DATA),
    ),
)
# Qwen-MoE and Qwen3.5-MoE shared expert (a dense feed-forward).
_SHARED_EXPERT_RULES = (
    (
        r"[^/]*sparse_moe_block[^/]*/shared_expert[^/]*/"
        r"feedforward_(intermediate|gate)_dense/kernel",
        (DATA, MODEL),
    ),
    (
        r"[^/]*sparse_moe_block[^/]*/shared_expert[^/]*/"
        r"feedforward_output_dense/kernel",
        (MODEL, DATA),
    ),
)
# Gemma, Gemma3, Gemma4: (H, d, hd) attention kernels.
_GEMMA_RULES = (
    (r"attention/(query|key|value)/kernel", (MODEL, DATA, None)),
    (r"attention/attention_output/kernel", (MODEL, None, DATA)),
    (r"ffw_gating(_2)?/kernel", (DATA, MODEL)),
    (r"ffw_linear/kernel", (MODEL, DATA)),
)
# keras-hub's TransformerDecoder (GPT-2, OPT): Llama's names without the gate.
_TRANSFORMER_DECODER_RULES = (
    (r"self_attention/(query|key|value)/kernel", (MODEL, DATA, None)),
    (r"self_attention/attention_output/kernel", (MODEL, None, DATA)),
    (r"feedforward_intermediate_dense/kernel", (DATA, MODEL)),
    (r"feedforward_output_dense/kernel", (MODEL, DATA)),
)
# Vocabularies that divide no mesh axis (GPT-2's 50257): shard the width.
_POSITION_EMBEDDING_RULES = (
    (r"token_embedding/embeddings", (None, MODEL)),
    (r"position_embedding/embeddings", (None, MODEL)),
)
_GATED_DELTA_NET_RULES = (
    (r"linear_attn/in_proj_(qkv|z)/kernel", (DATA, MODEL)),
    (r"linear_attn/out_proj/kernel", (MODEL, DATA)),
    (r"linear_attn/conv1d_kernel", (MODEL, None)),
)


# === Family helpers ==========================================================


def _heads(h):
    """Grouped-query attention: two query heads share a key/value head."""
    return {"num_query_heads": h, "num_key_value_heads": max(1, h // 2)}


def _attention_types(num_layers, period, full, other):
    """`period`-periodic layer types, the last layer always `full`: every
    family here ends with a full-attention layer in its released models."""
    return [
        full if (i % period == period - 1 or i == num_layers - 1) else other
        for i in range(num_layers)
    ]


def _gemma3_global(config, backbone):
    """A Gemma3 layer's config made global, as `Gemma3Backbone` builds its
    global layers (every 6th): no sliding window, RoPE wavelength 1e6 and
    the global RoPE scaling factor."""
    return {
        **config,
        "use_sliding_window_attention": False,
        "rope_wavelength": 1_000_000.0,
        "rope_scaling_factor": backbone.global_rope_scaling_factor,
    }


def _gemma4_block(config, backbone):
    """A Gemma4 layer's config as a standalone full-attention block.

    The MTP block has no per-layer token input (E2B/E4B's per-layer
    embeddings are indexed by the backbone's layer) and computes its own
    keys and values (no KV sharing); a sliding layer (a backbone with no
    global layer) becomes global as `Gemma4Backbone` builds global layers.
    """
    config = {
        **config,
        "is_kv_shared_layer": False,
        "kv_shared_layer_index": None,
        "hidden_size_per_layer_input": 0,
    }
    if config.get("is_global_attention"):
        return config
    global_heads = backbone.num_global_key_value_heads
    return {
        **config,
        "use_sliding_window_attention": False,
        "is_global_attention": True,
        "rope_wavelength": backbone.global_rope_wavelength or 1_000_000.0,
        "rope_scaling_factor": backbone.global_rope_scaling_factor,
        "rope_partial_rotary_factor": (
            backbone.global_rope_partial_rotary_factor
        ),
        "attention_k_eq_v": global_heads is not None,
        "num_global_key_value_heads": global_heads,
    }


def _qwen3_5_full(config, backbone):
    return {**config, "layer_type": "full_attention"}


def _gpt_oss_full(config, backbone):
    return {**config, "sliding_window": None}


def _qwen_moe_layer(layer):
    return (
        layer.layer_index not in layer.mlp_only_layers
        and layer.num_experts > 0
        and (layer.layer_index + 1) % layer.decoder_sparse_step == 0
    )


def _qwen3_5_tiny(**moe):
    return dict(
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        hidden_dim=16,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        **moe,
    )


def _qwen3_5_train(d, n, h, f, t, **moe):
    # Qwen3.5 rotates a quarter of each head; RoPE needs an even count.
    rotary = next(r for r in (0.25, 0.5, 1.0) if (d // h * r) % 2 == 0)
    return dict(
        num_layers=n,
        head_dim=d // h,
        partial_rotary_factor=rotary,
        hidden_dim=d,
        layer_types=_attention_types(
            n, 4, "full_attention", "linear_attention"
        ),
        linear_num_key_heads=max(1, h // 2),
        linear_num_value_heads=h,
        linear_key_head_dim=d // h,
        linear_value_head_dim=d // h,
        **_heads(h),
        **moe,
    )


_QWEN3_5_GENERATE = (
    "keras-hub 0.32's Qwen3_5CausalLM.generate prefills the Gated DeltaNet "
    "states over the whole padded `max_length` (the state keeps decaying "
    "over the padding) and then feeds the last prompt token a second time "
    "(the sampler's first step), so its output is not the greedy decoding "
    "of the model's own forward pass and depends on the other prompts of "
    "the batch. keras_mtp's `generate` (speculative or not) is."
)

_QWEN3_5_PACKING = (
    "its Gated DeltaNet layers carry a recurrent state along the whole row "
    "and take no attention mask, so a document would read the state the "
    "documents before it left; keras-hub 0.32 has no way to reset it at a "
    "segment boundary. Train it on unpacked rows (one document per row, "
    "padded)."
)

_KERAS_HUB_TRANSFORMER_DECODER = "TransformerDecoder"

FAMILIES = (
    Family(
        name="gpt2",
        backbone="GPT2Backbone",
        decoders=(_KERAS_HUB_TRANSFORMER_DECODER,),
        tiny=dict(
            num_layers=1,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            max_sequence_length=32,
            dropout=0.0,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            num_heads=h,
            hidden_dim=d,
            intermediate_dim=f,
            dropout=0.0,
            max_sequence_length=t,
        ),
        learned_positions=True,
        position_layer="position_embedding",
        layout=Layout(
            decoder_rules=_TRANSFORMER_DECODER_RULES,
            embedding_rules=_POSITION_EMBEDDING_RULES,
        ),
    ),
    Family(
        name="llama",  # and Llama3Backbone, a subclass
        backbone="LlamaBackbone",
        decoders=("LlamaTransformerDecoder",),
        tiny=dict(
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n, hidden_dim=d, intermediate_dim=f, **_heads(h)
        ),
        layout=Layout(decoder_rules=_LLAMA_RULES),
    ),
    Family(
        name="mistral",
        backbone="MistralBackbone",
        decoders=("MistralTransformerDecoder",),
        tiny=dict(
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            sliding_window=4,  # shorter than the tests' sequences
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n, hidden_dim=d, intermediate_dim=f, **_heads(h)
        ),
        layout=Layout(decoder_rules=_LLAMA_RULES),
    ),
    Family(
        name="gemma",
        backbone="GemmaBackbone",
        decoders=("GemmaDecoderBlock",),
        tiny=dict(
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            head_dim=8,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            hidden_dim=d,
            intermediate_dim=f,
            head_dim=d // h,
            **_heads(h),
        ),
        embedding_scale=True,
        mask_kwarg="padding_mask",
        cache_kwargs=("cache", "cache_update_index"),
        attention_mask_kwarg=None,
        attention_mask_method="_compute_attention_mask",
        layout=Layout(
            decoder_prefix=r"decoder_block_\d+/", decoder_rules=_GEMMA_RULES
        ),
    ),
    Family(
        name="gemma3",  # text-only: vision_encoder=None
        backbone="Gemma3Backbone",
        decoders=("Gemma3DecoderBlock",),
        tiny=dict(
            image_size=16,
            num_layers=2,  # both sliding: the MTP block is the global variant
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            head_dim=8,
            use_sliding_window_attention=True,
            sliding_window_size=4,
            vision_encoder=None,
        ),
        train=lambda d, n, h, f, t: dict(
            image_size=16,
            num_layers=n,
            hidden_dim=d,
            intermediate_dim=f,
            head_dim=d // h,
            use_sliding_window_attention=True,
            sliding_window_size=max(t // 4, 1),
            vision_encoder=None,
            **_heads(h),
        ),
        embedding_scale=True,
        full_attention=lambda layer: not layer.use_sliding_window_attention,
        block_config=_gemma3_global,
        mask_kwarg="padding_mask",
        cache_kwargs=("cache", "cache_update_index"),
        attention_mask_kwarg=None,
        attention_mask_method="_compute_attention_mask",
        cache_layout="per_layer",
        task_masks=True,
        layout=Layout(
            decoder_prefix=r"decoder_block_\d+/", decoder_rules=_GEMMA_RULES
        ),
    ),
    Family(
        name="gemma4",  # text-only: no vision or audio encoder
        backbone="Gemma4Backbone",
        decoders=("Gemma4TextDecoderBlock",),
        tiny=dict(
            image_size=16,
            num_layers=2,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            head_dim=8,
            sliding_window_size=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        train=lambda d, n, h, f, t: dict(
            image_size=16,
            num_layers=n,
            hidden_dim=d,
            intermediate_dim=f,
            head_dim=d // h,
            sliding_window_size=max(t // 4, 1),
            layer_types=_attention_types(
                n, 6, "full_attention", "sliding_attention"
            ),
            **_heads(h),
        ),
        embedding_scale=True,
        full_attention=lambda layer: layer.is_global_attention,
        block_config=_gemma4_block,
        mask_kwarg="padding_mask",
        cache_kwargs=("cache", "cache_update_index"),
        attention_mask_kwarg=None,
        attention_mask_method="_compute_attention_mask",
        task_masks=True,
        layout=Layout(
            decoder_prefix=r"decoder_block_\d+/", decoder_rules=_GEMMA_RULES
        ),
    ),
    Family(
        name="qwen",  # Qwen2 (QwenBackbone, alias Qwen2Backbone)
        backbone="QwenBackbone",
        decoders=("QwenTransformerDecoder",),
        tiny=dict(
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            # No sliding window (keras-hub's default): keras-hub 0.32's
            # QwenAttention tests `if cache_update_index` on a tensor, so a
            # sliding-window Qwen2 cannot decode in a TensorFlow graph (its
            # own `generate` fails too).
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n, hidden_dim=d, intermediate_dim=f, **_heads(h)
        ),
        layout=Layout(decoder_rules=_LLAMA_RULES),
    ),
    Family(
        name="qwen_moe",
        backbone="QwenMoeBackbone",
        decoders=("QwenMoeTransformerDecoder",),
        tiny=dict(
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            moe_intermediate_dim=16,
            shared_expert_intermediate_dim=16,
            num_experts=4,
            top_k=2,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            hidden_dim=d,
            intermediate_dim=f,
            moe_intermediate_dim=f // 2,
            shared_expert_intermediate_dim=f // 2,
            num_experts=4,
            top_k=2,
            **_heads(h),
        ),
        moe=_qwen_moe_layer,
        layout=Layout(
            decoder_rules=_LLAMA_RULES + _MOE_RULES + _SHARED_EXPERT_RULES
        ),
    ),
    Family(
        name="qwen3",
        backbone="Qwen3Backbone",
        decoders=("Qwen3TransformerDecoder",),
        tiny=dict(
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            hidden_dim=16,
            intermediate_dim=32,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            hidden_dim=d,
            intermediate_dim=f,
            head_dim=d // h,
            **_heads(h),
        ),
        layout=Layout(decoder_rules=_LLAMA_RULES),
    ),
    Family(
        name="qwen3_moe",
        backbone="Qwen3MoeBackbone",
        decoders=("Qwen3MoeTransformerDecoder",),
        tiny=dict(
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            hidden_dim=16,
            intermediate_dim=32,
            moe_intermediate_dim=16,
            num_experts=4,
            top_k=2,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            hidden_dim=d,
            intermediate_dim=f,
            head_dim=d // h,
            moe_intermediate_dim=f // 2,
            num_experts=4,
            top_k=2,
            **_heads(h),
        ),
        moe=lambda layer: layer.is_sparse_mlp,
        layout=Layout(decoder_rules=_LLAMA_RULES + _MOE_RULES),
    ),
    Family(
        name="qwen3_5",  # hybrid: Gated DeltaNet and full-attention layers
        backbone="Qwen3_5Backbone",
        decoders=("Qwen3_5TransformerDecoder",),
        tiny=_qwen3_5_tiny(intermediate_dim=32),
        train=lambda d, n, h, f, t: _qwen3_5_train(
            d, n, h, f, t, intermediate_dim=f
        ),
        full_attention=lambda layer: layer.layer_type == "full_attention",
        block_config=_qwen3_5_full,
        cache_layout="hybrid",
        recurrent=True,
        keras_hub_generate=_QWEN3_5_GENERATE,
        no_packing=_QWEN3_5_PACKING,
        layout=Layout(decoder_rules=_LLAMA_RULES + _GATED_DELTA_NET_RULES),
    ),
    Family(
        name="qwen3_5_moe",
        backbone="Qwen3_5MoeBackbone",
        decoders=("Qwen3_5MoeTransformerDecoder",),
        tiny=_qwen3_5_tiny(
            moe_intermediate_dim=16,
            shared_expert_intermediate_size=16,
            num_experts=4,
            top_k=2,
        ),
        train=lambda d, n, h, f, t: _qwen3_5_train(
            d,
            n,
            h,
            f,
            t,
            moe_intermediate_dim=f // 2,
            shared_expert_intermediate_size=f // 2,
            num_experts=4,
            top_k=2,
        ),
        full_attention=lambda layer: layer.layer_type == "full_attention",
        block_config=_qwen3_5_full,
        cache_layout="hybrid",
        recurrent=True,
        keras_hub_generate=_QWEN3_5_GENERATE,
        no_packing=_QWEN3_5_PACKING,
        layout=Layout(
            decoder_rules=_LLAMA_RULES
            + _GATED_DELTA_NET_RULES
            + _MOE_RULES
            + _SHARED_EXPERT_RULES
        ),
    ),
    Family(
        name="mixtral",
        backbone="MixtralBackbone",
        decoders=("MixtralTransformerDecoder",),
        tiny=dict(
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            num_experts=4,
            top_k=2,
            sliding_window=4,  # shorter than the tests' sequences
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            hidden_dim=d,
            intermediate_dim=f,
            num_experts=4,
            top_k=2,
            **_heads(h),
        ),
        layout=Layout(decoder_rules=_LLAMA_RULES + _MOE_RULES),
    ),
    Family(
        name="phi3",
        backbone="Phi3Backbone",
        decoders=("Phi3Decoder",),
        tiny=dict(
            num_layers=1,
            hidden_dim=16,
            intermediate_dim=32,
            num_query_heads=2,
            num_key_value_heads=1,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n, hidden_dim=d, intermediate_dim=f, **_heads(h)
        ),
        cache_kwargs=("attention_cache", "attention_cache_update_index"),
        layout=Layout(
            decoder_rules=(
                (r"attention/(query|key|value)/kernel", (MODEL, DATA, None)),
                (r"attention/attention_output/kernel", (MODEL, None, DATA)),
            )
            + _LLAMA_RULES[2:]
        ),
    ),
    Family(
        name="smollm3",  # also SmolLMBackbone, an alias
        backbone="SmolLM3Backbone",
        decoders=("SmolLM3DecoderLayer",),
        tiny=dict(
            hidden_dim=16,
            intermediate_dim=32,
            num_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            attention_bias=False,
            attention_dropout=0.0,
            rope_layer_enabled_list=[True],
            layer_types=["attention"],
            mlp_bias=False,
            layer_norm_epsilon=1e-6,
            max_position_embeddings=64,
            rope_theta=10000.0,
            partial_rotary_factor=1.0,
        ),
        train=lambda d, n, h, f, t: dict(
            hidden_dim=d,
            intermediate_dim=f,
            num_layers=n,
            num_attention_heads=h,
            num_key_value_heads=max(1, h // 2),
            attention_bias=False,
            attention_dropout=0.0,
            # SmolLM3-3B: no RoPE in every 4th layer.
            rope_layer_enabled_list=[i % 4 != 3 for i in range(n)],
            layer_types=["attention"] * n,
            mlp_bias=False,
            layer_norm_epsilon=1e-6,
            max_position_embeddings=t,
            rope_theta=10000.0,
            partial_rotary_factor=1.0,
        ),
        final_norm="norm",
        layout=Layout(
            decoder_rules=(
                (r"self_attn/(q|k|v)_proj/kernel", (DATA, MODEL)),
                (r"o_proj/kernel", (MODEL, None, DATA)),  # MTP blocks'
                (r"mlp/(gate|up)_proj/kernel", (DATA, MODEL)),
                (r"mlp/down_proj/kernel", (MODEL, DATA)),
            ),
            # The backbone's: SmolLM3Attention builds `o_proj` in `__init__`,
            # outside its layer's name scope, so every backbone layer's
            # output projection is `o_proj/kernel` (`MTPLayer` scopes its
            # block's). On torch, Keras registers parameters by path: a
            # SmolLM3 backbone of 2+ layers has kernels left out of
            # `zero_grad` (their gradients add up over steps), a keras-hub
            # issue; the tests' backbone has one layer.
            extra_rules=((r"^o_proj/kernel", (MODEL, None, DATA)),),
        ),
        scoped_paths=False,  # the MTP blocks' `o_proj`: no `mtp_block/`
    ),
    Family(
        name="gpt_oss",
        backbone="GptOssBackbone",
        decoders=("GptOssTransformerDecoder",),
        tiny=dict(
            num_layers=2,  # layer 0 full attention, layer 1 sliding
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            head_dim=8,
            num_experts=4,
            top_k=2,
            sliding_window=4,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            hidden_dim=d,
            intermediate_dim=f,
            head_dim=d // h,
            num_experts=4,
            top_k=2,
            sliding_window=max(t // 4, 1),
            **_heads(h),
        ),
        full_attention=lambda layer: layer.sliding_window is None,
        block_config=_gpt_oss_full,
        layout=Layout(
            decoder_rules=_LLAMA_RULES[:2]
            + (
                # `$`: the kernels' names begin their biases' names.
                (
                    r"sparse_moe_block/experts/gate_up_proj$",
                    (MODEL, DATA, None),
                ),
                (r"sparse_moe_block/experts/down_proj$", (MODEL, None, DATA)),
                (
                    r"sparse_moe_block/experts/(gate_up|down)_proj_bias",
                    (MODEL, None),
                ),
            )
        ),
    ),
    Family(
        name="gpt_neox",
        backbone="GPTNeoXBackbone",
        decoders=("GPTNeoXDecoder",),
        tiny=dict(
            num_layers=1,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            max_sequence_length=64,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            num_heads=h,
            hidden_dim=d,
            intermediate_dim=f,
            max_sequence_length=t,
        ),
        layout=Layout(
            decoder_rules=(
                (r"self_attention/query_key_value/kernel", (MODEL, DATA, None)),
                (r"self_attention/attention_output/kernel", (MODEL, DATA)),
                (r"feedforward_intermediate_dense/kernel", (DATA, MODEL)),
                (r"feedforward_output_dense/kernel", (MODEL, DATA)),
            )
        ),
    ),
    Family(
        name="opt",
        backbone="OPTBackbone",
        decoders=(_KERAS_HUB_TRANSFORMER_DECODER,),
        tiny=dict(
            num_layers=1,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            dropout=0.0,
            max_sequence_length=32,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            num_heads=h,
            hidden_dim=d,
            intermediate_dim=f,
            dropout=0.0,
            max_sequence_length=t,
        ),
        learned_positions=True,
        position_layer="embeddings",
        layout=Layout(
            decoder_rules=_TRANSFORMER_DECODER_RULES,
            embedding_rules=tuple(
                ("embeddings/" + key, layout)
                for key, layout in _POSITION_EMBEDDING_RULES
            ),
        ),
    ),
    Family(
        name="bloom",
        backbone="BloomBackbone",
        decoders=("BloomDecoder",),
        tiny=dict(
            num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n, num_heads=h, hidden_dim=d, intermediate_dim=f
        ),
        cache_kwargs=("cache", "cache_update_index"),
        layout=Layout(
            decoder_rules=(
                (
                    r"self_attention/(query|key|value)_dense/kernel",
                    (MODEL, DATA, None),
                ),
                (r"self_attention/output_dense/kernel", (MODEL, DATA)),
                (r"mlp_intermediate_dense/kernel", (DATA, MODEL)),
                (r"mlp_output_dense/kernel", (MODEL, DATA)),
            )
        ),
    ),
    Family(
        name="falcon",
        backbone="FalconBackbone",
        decoders=("FalconTransformerDecoder",),
        tiny=dict(
            num_layers=1,
            num_attention_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
        ),
        train=lambda d, n, h, f, t: dict(
            num_layers=n,
            num_attention_heads=h,
            hidden_dim=d,
            intermediate_dim=f,
        ),
        final_norm="final_layernorm",
        cache_kwargs=("attention_cache", "attention_cache_update_index"),
        layout=Layout(
            decoder_rules=(
                (
                    r"attention/(query|key|value)_dense/kernel",
                    (MODEL, DATA, None),
                ),
                (r"attention/output_dense/kernel", (MODEL, DATA)),
                (r"dense_h_to_4h/kernel", (DATA, MODEL)),
                (r"dense_4h_to_h/kernel", (MODEL, DATA)),
            )
        ),
    ),
)

# keras-hub 0.32 causal LMs that are not decoder-only text transformers whose
# decoder layer an MTP block could copy.
UNSUPPORTED = {
    "PaliGemmaCausalLM": "multimodal only (image + text prefix-LM); its text "
    "decoder is Gemma's, supported as `GemmaBackbone`",
    "BLIP2CausalLM": "multimodal only (vision encoder, Q-Former, OPT)",
    "Gemma3nCausalLM": "multimodal; its text decoder layers take AltUp "
    "multi-stream inputs and per-layer embeddings, not one hidden state",
    "Gemma4AssistantCausalLM": "a drafter for Gemma4's own speculative "
    "decoding (every layer reads the target model's shared KV cache), not "
    "a standalone language model",
    "RWKV7CausalLM": "RWKV-7 is a recurrent model, not a transformer: no "
    "attention layer to copy and no position-indexed cache",
    "PARSeqCausalLM": "scene-text recognition (image to text)",
}

FAMILY_NAMES = tuple(family.name for family in FAMILIES)
_BY_NAME = {family.name: family for family in FAMILIES}
_BY_DECODER = {}
for _family in FAMILIES:
    for _decoder in _family.decoders:
        _other = _BY_DECODER.setdefault(_decoder, _family)
        assert (
            _other.mask_kwarg,
            _other.cache_kwargs,
            _other.attention_mask_kwarg,
            _other.attention_mask_method,
        ) == (
            _family.mask_kwarg,
            _family.cache_kwargs,
            _family.attention_mask_kwarg,
            _family.attention_mask_method,
        ), f"{_other.name} and {_family.name} share {_decoder}"


def family(name_or_backbone):
    """The `Family` of a name (`"gemma3"`) or of a backbone instance.

    Raises a `ValueError` naming the backbone's class if none matches.
    """
    if isinstance(name_or_backbone, str):
        if name_or_backbone not in _BY_NAME:
            raise ValueError(
                f"Unknown backbone family {name_or_backbone!r}. Expected one "
                f"of {list(FAMILY_NAMES)}"
            )
        return _BY_NAME[name_or_backbone]
    # The most derived match first (no family subclasses another today).
    matches = [
        f
        for f in FAMILIES
        if getattr(keras_hub.models, f.backbone, None) is not None
        and isinstance(name_or_backbone, f.backbone_class)
    ]
    if not matches:
        raise ValueError(
            "keras_mtp supports the keras-hub causal backbones "
            f"{sorted(f.backbone for f in FAMILIES)}. Received: backbone of "
            f"class {type(name_or_backbone).__name__}"
        )
    return min(matches, key=lambda f: -len(f.backbone_class.__mro__))


def decoder_family(block):
    """The `Family` whose decoder layer class `block` is, or None."""
    return _BY_DECODER.get(type(block).__name__)


def tiny_backbone(name, vocabulary_size=32, **overrides):
    """A tiny randomly initialized backbone of family `name` (tests)."""
    f = family(name)
    return f.backbone_class(
        vocabulary_size=vocabulary_size, **{**f.tiny, **overrides}
    )


def build_backbone(
    name,
    vocabulary_size,
    hidden_dim,
    num_layers,
    num_heads,
    intermediate_dim,
    sequence_length,
):
    """`train.py`'s backbone of family `name`, sized by these arguments."""
    f = family(name)
    kwargs = f.train(
        hidden_dim, num_layers, num_heads, intermediate_dim, sequence_length
    )
    return f.backbone_class(vocabulary_size=vocabulary_size, **kwargs)


# === What MTP reads from a backbone ==========================================


def check_backbone(backbone):
    """Raises a `ValueError` naming `backbone` if MTP cannot wrap it."""
    f = family(backbone)
    embedding = backbone.token_embedding
    if not isinstance(embedding, keras.layers.ReversibleEmbedding):
        raise ValueError(
            "MTP shares the backbone's `token_embedding`, which must be a "
            "`keras.layers.ReversibleEmbedding`. Received: "
            f"{type(embedding).__name__} on {type(backbone).__name__}"
        )
    for name in ("vision_encoder", "audio_encoder"):
        if getattr(backbone, name, None) is not None:
            raise ValueError(
                f"keras_mtp supports text-only {f.backbone}s. Received: a "
                f"backbone with a `{name}`; build it with `{name}=None`."
            )


def backbone_inputs(backbone, token_ids, padding_mask):
    """The backbone's input dict for `token_ids` and `padding_mask`: theirs,
    plus the text positions `0 .. T-1` where the backbone takes
    `position_ids` (Gemma4, as its preprocessor gives them for text)."""
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if "position_ids" in backbone.input:
        # All tensors (Keras refuses a mix of NumPy arrays and tensors).
        inputs = {
            key: value
            if isinstance(value, keras.KerasTensor)
            else ops.convert_to_tensor(value)
            for key, value in inputs.items()
        }
        ones = ops.ones_like(inputs["token_ids"], dtype="int32")
        inputs["position_ids"] = ops.cumsum(ones, axis=1) - 1
    return inputs


# === Packed rows ==============================================================


def _run_starts(segments):
    """`(B, T)` booleans: True where a run of equal ids begins (equal ids
    apart are two runs, hence two documents)."""
    previous = ops.pad(segments[:, :-1], [[0, 0], [1, 0]], constant_values=-1)
    return segments != previous


def segment_attention_mask(segment_ids):
    """The `(B, T, T)` boolean attention mask of packed rows.

    Query `i` may attend to key `j` iff `j <= i` and both lie in the same
    segment, a run of equal ids: a token sees only the earlier tokens of
    its own document. Id 0 is padding: a padding query may attend to every
    earlier key, as in an unpacked padded row, so no row of the mask is
    empty (an empty row is NaN on some attention kernels); a padding key is
    visible to every later query, where the decoder layers' own padding
    mask hides it (a real token of id 0 thus stays context for the whole
    row, e.g. a prompt whose positions no MTP depth trains on). Made by
    broadcasting `(B, T, 1)` against `(B, 1, T)`: the mask is the only
    `(B, T, T)` tensor.
    """
    segments = ops.cast(segment_ids, "int32")
    runs = ops.cumsum(ops.cast(_run_starts(segments), "int32"), axis=1)
    same = ops.expand_dims(runs, 2) == ops.expand_dims(runs, 1)
    padding = segments == 0
    visible = ops.logical_or(
        same,
        ops.logical_or(
            ops.expand_dims(padding, 2), ops.expand_dims(padding, 1)
        ),
    )
    index = ops.arange(ops.shape(segments)[1])
    causal = ops.expand_dims(index, 1) >= ops.expand_dims(index, 0)
    return ops.logical_and(visible, ops.expand_dims(causal, 0))


def segment_positions(segment_ids):
    """Per-document positions `(B, T)` int32: `0, 1, ...` from the first
    token of each run of equal ids (padding runs too); `O(B T)`, a running
    maximum of the run starts."""
    segments = ops.cast(segment_ids, "int32")
    index = ops.expand_dims(ops.arange(ops.shape(segments)[1]), 0)
    index = ops.broadcast_to(index, ops.shape(segments))
    starts = ops.where(_run_starts(segments), index, 0)
    start = ops.associative_scan(ops.maximum, starts, axis=1)
    # TensorFlow's scan loses the static shape, which keras-hub's position
    # embedding reads.
    start = ops.reshape(start, ops.shape(segments))
    return ops.cast(index - start, "int32")


def check_packing(backbone):
    """Raises a `ValueError` naming the family of `backbone` (an instance or
    a family name) if its packed rows cannot be kept apart
    (`Family.no_packing`)."""
    f = family(backbone)
    if f.no_packing is not None:
        raise ValueError(
            f"Packed rows (`segment_ids`) are not supported for the "
            f"{f.name!r} family ({f.backbone}): {f.no_packing}"
        )


@contextlib.contextmanager
def _and_mask_into(layer, method, mask):
    """Inside the block, `layer.<method>(...)` (an attention mask maker)
    returns its mask AND `mask`."""
    original = getattr(layer, method)

    def masked(*args, **kwargs):
        own = original(*args, **kwargs)
        return ops.logical_and(ops.cast(own, "bool"), mask)

    setattr(layer, method, masked)
    try:
        yield
    finally:
        delattr(layer, method)  # the class's method again


def _call_with_attention_mask(f, layer, mask, *args, **kwargs):
    """`layer(*args, **kwargs)` with `mask` ANDed into its attention mask,
    the way family `f`'s decoder layers take one."""
    if f.attention_mask_kwarg is not None:
        return layer(*args, **{**kwargs, f.attention_mask_kwarg: mask})
    with _and_mask_into(layer, f.attention_mask_method, mask):
        return layer(*args, **kwargs)


def call_backbone(backbone, inputs, segment_ids=None):
    """The backbone's sequence output for `inputs` (`backbone_inputs`).

    Without `segment_ids`, exactly `backbone(inputs)`. With them (packed
    rows, `(B, T)`, 0 = padding), keras-hub's functional graph is run op by
    op, the same layers and weights, with each decoder layer's attention
    limited to its own document (`segment_attention_mask`) and positions
    restarting at each document's first token where the family's are
    absolute (`Family.position_layer`, Gemma4's `position_ids`). RoPE and
    ALiBi are relative: a document's attention is the same wherever it
    starts. Raises a `ValueError` for a family that cannot do it
    (`Family.no_packing`).
    """
    if segment_ids is None:
        return backbone(inputs)
    check_packing(backbone)
    f = family(backbone)
    mask = segment_attention_mask(segment_ids)
    positions = None
    if f.position_layer is not None or "position_ids" in inputs:
        positions = segment_positions(segment_ids)
    if "position_ids" in inputs:
        inputs = {**inputs, "position_ids": positions}
    decoders = {id(layer) for layer in backbone.transformer_layers}

    def operation_fn(op):
        def call(*args, **kwargs):
            if id(op) in decoders:
                return _call_with_attention_mask(f, op, mask, *args, **kwargs)
            if positions is not None and op.name == f.position_layer:
                return op(*args, **{**kwargs, "positions": positions})
            return op(*args, **kwargs)

        return call

    flat_inputs = backbone._standardize_inputs(inputs)
    outputs = backbone._run_through_graph(flat_inputs, operation_fn)
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def embedding_scale(backbone):
    """The factor the backbone multiplies token embeddings by, or None."""
    if family(backbone).embedding_scale:
        return float(backbone.hidden_dim) ** 0.5
    return None


def layer_norm_epsilon(backbone):
    """The backbone's norm epsilon, reused by the MTP input RMSNorms."""
    return float(getattr(backbone, "layer_norm_epsilon", 1e-6))


def block_source_index(backbone):
    """Index of the decoder layer the MTP blocks copy: the last
    full-attention layer (the last layer where all layers attend alike),
    preferring MoE layers in MoE families; the last layer if the backbone
    has no full-attention layer (`Family.block_config` then makes it one)."""
    f = family(backbone)
    layers = backbone.transformer_layers
    candidates = list(range(len(layers)))
    if f.full_attention is not None:
        full = [i for i in candidates if f.full_attention(layers[i])]
        candidates = full or candidates[-1:]
    if f.moe is not None:
        candidates = [i for i in candidates if f.moe(layers[i])] or candidates
    return candidates[-1]


def final_norm(backbone):
    """The backbone's final norm layer."""
    return getattr(backbone, family(backbone).final_norm)


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
    of the same name, which those layers all store. `GPTNeoXDecoder`'s config
    has a `decoder_sequence_shape` its constructor refuses: dropped.
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
    for name in ("decoder_sequence_shape", "encoder_sequence_shape"):
        if name in config and name not in parameters:
            del config[name]
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
    """Blueprint of the MTP block: the decoder layer `block_source_index`
    picks (MoE stays MoE), turned into its standalone full-attention variant
    by `Family.block_config` where the family has one."""
    f = family(backbone)
    blueprint = layer_blueprint(
        backbone.transformer_layers[block_source_index(backbone)]
    )
    if f.block_config is not None:
        config = f.block_config(dict(blueprint["config"]), backbone)
        blueprint = {**blueprint, "config": config}
    return blueprint


def final_norm_blueprint(backbone):
    """Blueprint of the backbone's final norm (the type of `Norm_k`)."""
    return layer_blueprint(final_norm(backbone))


def _call_forms(block):
    """`(mask keyword, (cache keyword, cache index keyword))` of `block`:
    its family's, or read from its `call` signature."""
    f = decoder_family(block)
    if f is not None:
        return f.mask_kwarg, f.cache_kwargs
    parameters = inspect.signature(block.call).parameters
    mask = next(
        (
            name
            for name in ("decoder_padding_mask", "padding_mask")
            if name in parameters
        ),
        None,
    )
    cache = next(
        (
            (name, name + "_update_index")
            for name in ("self_attention_cache", "attention_cache", "cache")
            if name in parameters
        ),
        None,
    )
    return mask, cache


def call_decoder(
    block, x, padding_mask, training=None, attention_mask=None, positions=None
):
    """Runs one keras-hub decoder layer causally over `x` with `padding_mask`.

    keras-hub decoders name the mask `decoder_padding_mask` (most) or
    `padding_mask` (Gemma), and some return a tuple. `attention_mask`
    (`(B, T, T)` booleans, packed rows) is ANDed into the layer's own
    causal mask the way its family takes one; `positions` (`(B, T)`) are
    passed where the layer takes them (Gemma4).
    """
    mask, _ = _call_forms(block)
    if mask is None:
        raise ValueError(
            f"Cannot pass a padding mask to {type(block).__name__}: its "
            f"`call` takes {list(inspect.signature(block.call).parameters)}"
        )
    kwargs = {mask: padding_mask}
    parameters = inspect.signature(block.call).parameters
    if "training" in parameters:
        kwargs["training"] = training
    if positions is not None and "positions" in parameters:
        kwargs["positions"] = positions
    if attention_mask is None:
        outputs = block(x, **kwargs)
    else:
        f = decoder_family(block)
        if f is None:
            raise ValueError(
                f"Cannot pass an attention mask to {type(block).__name__}: "
                "not the decoder layer of a family of "
                "`keras_mtp.backbones.FAMILIES`."
            )
        outputs = _call_with_attention_mask(
            f, block, attention_mask, x, **kwargs
        )
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def call_decoder_with_cache(block, x, cache, cache_update_index):
    """Runs one keras-hub decoder layer over `x` at positions
    `cache_update_index ...` against its key/value `cache`; returns
    `(outputs, cache)`. The keyword names differ by family (see
    `Family.cache_kwargs`)."""
    _, names = _call_forms(block)
    if names is None:
        raise ValueError(
            f"{type(block).__name__} takes no key/value cache: its `call` "
            f"takes {list(inspect.signature(block.call).parameters)}"
        )
    # A tensor index: SmolLM3's decoder takes its cache through `**kwargs`,
    # where Keras refuses a mix of tensors and Python numbers.
    index = ops.convert_to_tensor(cache_update_index, "int32")
    outputs = block(x, **{names[0]: cache, names[1]: index})
    return outputs[0], outputs[1]


def causal_lm(backbone):
    """keras-hub's `CausalLM` task for `backbone` (no preprocessor): its
    `call_with_cache` and `generate` run the main model with a KV cache."""
    f = family(backbone)
    # The most derived class first (`Llama3Backbone` -> `Llama3CausalLM`).
    for cls in type(backbone).__mro__:
        task = getattr(
            keras_hub.models, cls.__name__.replace("Backbone", "CausalLM"), None
        )
        if task is not None and cls.__name__.endswith("Backbone"):
            return task(backbone=backbone, preprocessor=None)
    raise ValueError(f"No keras-hub CausalLM for {f.backbone}")


# === The main model's cache (keras_mtp.speculative) ==========================


def prefill(task, token_ids, padding_mask):
    """keras-hub's prefill of `task` over `token_ids`: `(hidden, cache)`."""
    f = family(task.backbone)
    if f.task_masks:
        return task._build_cache(
            token_ids,
            img_embeddings=None,
            vision_mask=None,
            padding_mask=padding_mask,
            vision_indices=None,
        )
    if f.recurrent:
        raise ValueError(
            f"{f.backbone}'s keras-hub prefill is not exact (see "
            "`Family.keras_hub_generate`); keras_mtp.speculative prefills it "
            "token by token."
        )
    return task._build_cache(token_ids)


def call_with_cache(task, token_ids, cache, index, update_mask=None):
    """`task.call_with_cache` at positions `index ...`: `(logits, hidden,
    cache)`. `update_mask` (`(B, T)`, False at prompt positions) is passed
    where the family's keras-hub task takes one, as its `generate` does."""
    if family(task.backbone).task_masks and update_mask is not None:
        return task.call_with_cache(
            token_ids, cache, index, cache_update_mask=update_mask
        )
    return task.call_with_cache(token_ids, cache, index)


def recurrent_cache(backbone, batch, length, dtype):
    """Zero `(key_value, conv, recurrent)` caches of a hybrid trunk (Qwen3.5),
    shaped as keras-hub's `Qwen3_5CausalLM._build_cache` makes them."""
    b = backbone
    key_value = ops.zeros(
        [batch, b.num_layers, 2, length, b.num_key_value_heads, b.head_dim],
        dtype=dtype,
    )
    key_dim = b.linear_num_key_heads * b.linear_key_head_dim
    value_dim = b.linear_num_value_heads * b.linear_value_head_dim
    conv = ops.zeros(
        [
            batch,
            b.num_layers,
            2 * key_dim + value_dim,
            b.linear_conv_kernel_dim - 1,
        ],
        dtype=dtype,
    )
    recurrent = ops.zeros(
        [
            batch,
            b.num_layers,
            b.linear_num_value_heads,
            b.linear_key_head_dim,
            b.linear_value_head_dim,
        ],
        dtype="float32",
    )
    return key_value, conv, recurrent


def layer_cache(backbone, cache, index):
    """Layer `index`'s key/value cache within the task's `cache`."""
    layout = family(backbone).cache_layout
    if layout == "per_layer":
        return cache[index]
    if layout == "hybrid":
        return cache[0][:, index]
    return cache[:, index]


# === Embedding and head ======================================================


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
        # Rank 2, not "...d,vd->...v": TensorFlow's gradient of that einsum
        # builds a (V, d, ...) tensor: 18x slower at V=2048, d=64 and out of
        # memory (31 GiB) for 1024 tokens at V=32000, d=256.
        leading = ops.shape(hidden_states)[:-1]
        flat = ops.reshape(hidden_states, (-1, hidden_states.shape[-1]))
        logits = ops.einsum("nd,vd->nv", flat, kernel)
        logits = ops.reshape(logits, (*leading, kernel.shape[0]))
    else:  # kernel (d, V)
        logits = ops.matmul(hidden_states, kernel)
    cap = token_embedding.logit_soft_cap
    if cap is not None:
        logits = ops.tanh(logits / cap) * cap
    return logits


# === The output head while decoding (keras_mtp.speculative) =================


def decoding_kernel(token_embedding, token_ids=None):
    """The output head's kernel as stored, for decoding: the `(V, d)` table
    when tied, the `(d, V)` reverse embeddings when not; with `token_ids`
    `(K,)` (a draft vocabulary), only their rows (columns): `(K, d)` or
    `(d, K)`, gathered once per `generate` call, before the decoding loop.

    The stored layout, not a transposed copy: on XLA's CPU (SmolLM2's
    49,152 x 576 table, batch 1, 2 cores) the head costs 4.4 ms a row
    through the `(V, d)` table and 5.6 ms through a `(d, V)` copy, and 0.44
    vs 0.8 ms for K = 8192 rows.
    """
    if token_embedding.tie_weights:
        table = ops.convert_to_tensor(token_embedding.embeddings)
        if token_ids is None:
            return table
        return ops.take(table, token_ids, axis=0)
    kernel = ops.convert_to_tensor(token_embedding.reverse_embeddings)
    if token_ids is None:
        return kernel
    return ops.take(kernel, token_ids, axis=1)


def decoding_logits(token_embedding, hidden_states, kernel):
    """`token_embedding(hidden_states, reverse=True)` through a
    `decoding_kernel` (all of it, or a draft vocabulary's): the same ops,
    dtype rule (`reverse_dtype`) and `logit_soft_cap`."""
    if token_embedding.tie_weights:
        kernel = ops.transpose(kernel)  # folded into the dot by XLA
    dtype = token_embedding.reverse_dtype
    if dtype is not None:
        hidden_states = ops.cast(hidden_states, dtype)
        kernel = ops.cast(kernel, dtype)
    logits = ops.matmul(hidden_states, kernel)
    cap = token_embedding.logit_soft_cap
    if cap is not None:
        logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
    return logits


def _keep_tied_llama_embeddings():
    """keras-hub 0.32's `LlamaBackbone.get_config()` (and so `Llama3Backbone`'s)
    omits `tie_word_embeddings`: a tied model (SmolLM2, Llama 3.2 1B) saved to
    a preset or a `.keras` file came back untied and failed to load its own
    weights. The argument is added to the config the backbone writes."""
    from keras_hub.src.models.llama.llama_backbone import LlamaBackbone

    get_config = LlamaBackbone.get_config
    if getattr(get_config, "keeps_tied_embeddings", False):
        return

    def config_with_tie(self):
        config = get_config(self)
        config.setdefault("tie_word_embeddings", self.tie_word_embeddings)
        return config

    config_with_tie.keeps_tied_embeddings = True
    LlamaBackbone.get_config = config_with_tie


_keep_tied_llama_embeddings()
