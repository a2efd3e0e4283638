import re

import keras
import numpy as np

from keras_mtp import backbones

MTP_INITS = ("random", "identity")
# The weights through which a keras-hub decoder block writes into its
# residual stream (attention output and feed-forward down projection, under
# each family's names): zero, the block is the identity.
_RESIDUAL_OUTPUTS = re.compile(
    r"(attention_output|output_dense|ffw_linear|o_proj|down_proj|out_proj"
    r"|dense_4h_to_h)(/kernel|/bias|_bias)?$"
)


@keras.saving.register_keras_serializable(package="keras_mtp")
class MTPLayer(keras.layers.Layer):
    """One Multi-Token Prediction depth (DeepSeek-V3, §2.2).

    Given the previous depth's hidden state `h^{k-1}` and the embeddings `e`
    of the tokens `k` ahead, computes

    ```
    u   = W_k · concat(RMSNorm_e(e), RMSNorm_h(h^{k-1}))   # embedding first
    h^k = Block_k(u)                                       # causal, same mask
    ```

    and returns `(h^k, Norm_k(h^k))`: the hidden state for the next depth and
    its normed form for the shared output head. `W_k: 2d -> d` has no bias.

    Args:
        hidden_dim: int. The model width `d`.
        transformer_block: `keras.layers.Layer` or blueprint dict. A fresh
            layer of this class and config becomes `Block_k` (e.g. the
            backbone's last decoder layer; its weights are not shared).
        output_norm: `keras.layers.Layer` or blueprint dict. A fresh layer of
            this class and config becomes `Norm_k`.
        layer_norm_epsilon: float. Epsilon of the two input RMSNorms.
        mtp_init: `"random"` or `"identity"`. `"random"`: the layers'
            own initializers. `"identity"` (Medusa's zero-initialized
            residual block, for heads on a pretrained trunk): `W_k = [0; I]`
            passes `RMSNorm_h(h^{k-1})` through, the block's residual
            outputs (attention output, feed-forward down projection) start
            at zero so the block is the identity; the norms keep their
            initial unit scale. A fresh depth then predicts what the main head
            predicts at the same position (its logits are the main
            logits divided by a positive per-token factor), instead of
            starting confidently wrong through the shared head.
        **kwargs: base layer arguments, such as `name` and `dtype`.

    Call arguments:
        hidden_states: float tensor `(B, T, d)`, `h^{k-1}`.
        token_embeddings: float tensor `(B, T, d)`, `Emb(x[i + k])`.
        padding_mask: tensor `(B, T)`, 1 for real tokens.
        training: bool. Passed to the transformer block.
        attention_mask: optional bool tensor `(B, T, T)` of packed rows
            (`keras_mtp.backbones.segment_attention_mask`), ANDed into the
            block's causal mask.
        positions: optional int tensor `(B, T)`, per-document positions,
            for blocks that take them (Gemma4).

    Example:

    ```python
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=32)
    layer = keras_mtp.MTPLayer(
        hidden_dim=16,
        transformer_block=backbone.transformer_layers[-1],
        output_norm=backbone.layer_norm)
    h = np.random.rand(2, 8, 16).astype("float32")
    e = np.random.rand(2, 8, 16).astype("float32")
    hidden, normed = layer(h, e, np.ones((2, 8), "int32"))
    ```

    Reference:
        DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437, §2.2.
    """

    def __init__(
        self,
        hidden_dim,
        transformer_block,
        output_norm,
        layer_norm_epsilon=1e-6,
        mtp_init="random",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(
                f"`hidden_dim` must be a positive int. Received: {hidden_dim}"
            )
        check_mtp_init(mtp_init)
        # === Config ===
        self.hidden_dim = hidden_dim
        self.transformer_block_blueprint = backbones.layer_blueprint(
            transformer_block
        )
        self.output_norm_blueprint = backbones.layer_blueprint(output_norm)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.mtp_init = mtp_init

        # === Layers ===
        self.embedding_norm = keras.layers.RMSNormalization(
            epsilon=layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="embedding_norm",
        )
        self.hidden_norm = keras.layers.RMSNormalization(
            epsilon=layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="hidden_norm",
        )
        self.projection = keras.layers.Dense(
            hidden_dim,
            use_bias=False,
            dtype=self.dtype_policy,
            name="projection",
        )
        # Weights a keras-hub layer creates in its constructor (SmolLM3's
        # attention output and RoPE table) take the path of this depth, not
        # a bare path shared with the backbone's: on torch, Keras registers
        # parameters by path, and a duplicate is left out of `zero_grad`.
        with keras.name_scope(self.name), keras.name_scope("transformer_block"):
            self.transformer_block = backbones.build_from_blueprint(
                self.transformer_block_blueprint,
                name="transformer_block",
                dtype=self.dtype_policy,
            )
        self.output_norm = backbones.build_from_blueprint(
            self.output_norm_blueprint,
            name="output_norm",
            dtype=self.dtype_policy,
        )

    def build(
        self,
        hidden_states_shape,
        token_embeddings_shape=None,
        padding_mask_shape=None,
    ):
        shape = tuple(hidden_states_shape)
        self.embedding_norm.build(shape)
        self.hidden_norm.build(shape)
        self.projection.build(shape[:-1] + (2 * self.hidden_dim,))
        # Some keras-hub blocks build themselves from their config.
        for layer in (self.transformer_block, self.output_norm):
            if not layer.built:
                layer.build(shape)
        if self.mtp_init == "identity":
            self._identity_init()
        self.built = True

    def _identity_init(self):
        """`W_k = [0; I]` and zero residual outputs (see `mtp_init`)."""
        d = self.hidden_dim
        kernel = np.concatenate([np.zeros((d, d)), np.eye(d)])  # (2d, d)
        self.projection.kernel.assign(kernel.astype("float32"))
        block = self.transformer_block
        outputs = [v for v in block.weights if _RESIDUAL_OUTPUTS.search(v.path)]
        if not outputs:
            raise ValueError(
                "mtp_init='identity' found no residual output projection in "
                f"the block {type(block).__name__}; use mtp_init='random'. "
                f"Its weights: {[v.path for v in block.weights]}"
            )
        for variable in outputs:
            variable.assign(np.zeros(variable.shape, "float32"))

    def _combine(self, hidden_states, token_embeddings):
        """`M_k [RMSNorm(Emb); RMSNorm(h^{k-1})]`, `(B, T, d)`."""
        x = keras.ops.concatenate(
            [
                self.embedding_norm(token_embeddings),
                self.hidden_norm(hidden_states),
            ],
            axis=-1,
        )  # (B, T, 2d)
        return self.projection(x)

    def call(
        self,
        hidden_states,
        token_embeddings,
        padding_mask,
        training=None,
        attention_mask=None,
        positions=None,
    ):
        x = self._combine(hidden_states, token_embeddings)
        x = backbones.call_decoder(
            self.transformer_block,
            x,
            padding_mask,
            training=training,
            attention_mask=attention_mask,
            positions=positions,
        )
        return x, self.output_norm(x)

    def call_with_cache(
        self, hidden_states, token_embeddings, cache, cache_update_index
    ):
        """`call` for positions `cache_update_index ...` only, attending to
        earlier positions through the block's key/value `cache`; returns
        `(h^k, Norm_k(h^k), cache)`. For incremental decoding."""
        x = self._combine(hidden_states, token_embeddings)
        x, cache = backbones.call_decoder_with_cache(
            self.transformer_block, x, cache, cache_update_index
        )
        return x, self.output_norm(x), cache

    def compute_output_shape(self, hidden_states_shape, *args, **kwargs):
        return (tuple(hidden_states_shape), tuple(hidden_states_shape))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "transformer_block": self.transformer_block_blueprint,
                "output_norm": self.output_norm_blueprint,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "mtp_init": self.mtp_init,
            }
        )
        return config


def check_mtp_init(value):
    """Raises a `ValueError` unless `value` is one of `MTP_INITS`."""
    if not (isinstance(value, str) and value in MTP_INITS):
        raise ValueError(
            f"`mtp_init` must be one of {MTP_INITS}. Received: "
            f"mtp_init={value!r}"
        )
