import inspect

import keras
from keras import ops

from keras_mtp import backbones
from keras_mtp import ops as mtp_ops
from keras_mtp.inputs import check_length
from keras_mtp.mtp_layer import MTPLayer
from keras_mtp.mtp_layer import check_mtp_init
from keras_mtp.validation import check_int  # also importable from here
from keras_mtp.validation import check_loss_chunk_size
from keras_mtp.validation import check_loss_scaling_factor
from keras_mtp.validation import check_mtp_targets


@keras.saving.register_keras_serializable(package="keras_mtp")
class MTPBlock(keras.layers.Layer):
    """The chain of `D` MTP depths and their scaled auxiliary loss.

    With `h^0` the backbone's final sequence output and `x` the token ids,
    depth `k = 1..D` computes `h^k` from `h^{k-1}` and `Emb(x[i + k])` with
    its own `MTPLayer`, logits `z^k = Head(Norm_k(h^k))` with the shared head,
    and

    ```
    L_k   = sum_i w^k_i CE(z^k_i, x[i + k + 1]) / max(sum_i w^k_i, 1)
    L_mtp = (1 / D) sum_k L_k
    ```

    over every row and position of the batch (weights from
    `keras_mtp.ops.mtp_targets_and_weights`). With `mtp_targets="main"`,
    `CE(z^k_i, x[i + k + 1])` becomes `CE(z^k_i, softmax(sg(z^0_{i + k})))`:
    depth `k` learns the main head's (stop-gradient) distribution for the
    same token instead of the data's label. Each call adds
    `loss_scaling_factor * L_mtp` with `add_loss`; `MTPCausalLM` calls the
    block only in `fit` and `evaluate`, and its metrics read the per-depth
    values the block returns.

    Args:
        token_embedding: `keras.layers.ReversibleEmbedding`. The shared token
            embedding; reversed, it is the shared output head.
        transformer_block: `keras.layers.Layer` or blueprint dict. The class
            and config of each depth's block (not its weights).
        output_norm: `keras.layers.Layer` or blueprint dict. The class and
            config of each depth's output norm.
        num_layers: int >= 1. The number of depths `D`.
        loss_scaling_factor: float >= 0. `λ`; a non-trainable weight, so it can
            change during training without recompiling.
        detach_trunk: bool. If True, no gradient of the MTP loss reaches the
            hidden state `h^0`, the embedding or the head.
        embedding_scale: float or None. Factor on the token embeddings (the
            backbone's own, e.g. `sqrt(d)` for Gemma).
        layer_norm_epsilon: float. Epsilon of the MTP input RMSNorms.
        loss_chunk_size: int or None. If set, each depth's loss is computed
            over chunks of this many tokens with rematerialization, so no
            `(B, T, V)` logits tensor lives (for large vocabularies). Same
            value and gradients as the dense loss.
        mtp_targets: `"labels"` or `"main"`. What depth `k` learns at
            position `i`: the data's token `x[i + k + 1]`, or the main
            head's distribution `softmax(z^0_{i + k})` for it, computed from
            `h^0` under stop-gradient (soft cross-entropy, which is the KL
            divergence up to a constant; no gradient reaches the trunk
            through the teacher). Same positions and weights either way.
        **kwargs: base layer arguments, such as `name` and `dtype`.

    Call arguments:
        hidden_states: float tensor `(B, T, d)`, `h^0`.
        token_ids: int tensor `(B, T)`.
        padding_mask: tensor `(B, T)`, 1 for real tokens.
        segment_ids: optional int tensor `(B, T)` for packed rows, 0 = padding:
            no loss weight crosses a document boundary, and each depth's
            block attends within its document only (with per-document
            positions where it takes them).
        training: bool. Passed to the transformer blocks (dropout, MoE loss).

    Returns:
        A dict of float32 tensors `(D,)`: `"losses"` (`L_k`), `"accuracies"`
        (top-1 of depth `k` against the data's token `x[i + k + 1]` over its
        valid positions, whatever `mtp_targets`) and `"tokens"` (`sum_i
        w^k_i`, the number of valid positions); and `(D, B, T)` tensors:
        `"predictions"` (int32, depth `k`'s top-1 `argmax z^k_i`) and
        `"weights"` (`w^k_i`), from which `keras_mtp.ops.masked_acceptance`
        compares depth `k` with the main head's top-1.

    Example:

    ```python
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=32)
    block = keras_mtp.MTPBlock(
        token_embedding=backbone.token_embedding,
        transformer_block=backbone.transformer_layers[-1],
        output_norm=backbone.layer_norm,
        num_layers=2)
    x = {"token_ids": np.ones((2, 8), "int32"),
         "padding_mask": np.ones((2, 8), "int32")}
    outputs = block(backbone(x), x["token_ids"], x["padding_mask"])
    outputs["losses"]  # (2,): L_1, L_2
    ```

    Reference:
        DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437, §2.2.
    """

    def __init__(
        self,
        token_embedding,
        transformer_block,
        output_norm,
        num_layers=1,
        loss_scaling_factor=0.1,
        detach_trunk=False,
        embedding_scale=None,
        layer_norm_epsilon=1e-6,
        loss_chunk_size=None,
        mtp_targets="labels",
        mtp_init="random",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(token_embedding, keras.layers.ReversibleEmbedding):
            raise ValueError(
                "`token_embedding` must be a `keras.layers.ReversibleEmbedding`"
                f". Received: {type(token_embedding).__name__}"
            )
        num_layers = check_int(num_layers, "num_layers", minimum=1)
        check_loss_scaling_factor(loss_scaling_factor)
        loss_chunk_size = check_loss_chunk_size(loss_chunk_size)
        check_mtp_targets(mtp_targets)
        check_mtp_init(mtp_init)
        # === Config ===
        self.num_layers = num_layers
        self.loss_scaling_factor = float(loss_scaling_factor)
        self.detach_trunk = bool(detach_trunk)
        self.embedding_scale = embedding_scale
        self.layer_norm_epsilon = layer_norm_epsilon
        self.loss_chunk_size = loss_chunk_size
        self.mtp_targets = mtp_targets
        self.mtp_init = mtp_init

        # === Layers ===
        self.token_embedding = token_embedding
        self.mtp_layers = [
            MTPLayer(
                hidden_dim=token_embedding.output_dim,
                transformer_block=transformer_block,
                output_norm=output_norm,
                layer_norm_epsilon=layer_norm_epsilon,
                mtp_init=mtp_init,
                dtype=self.dtype_policy,
                name=f"mtp_layer_{k}",
            )
            for k in range(1, num_layers + 1)
        ]

    def build(self, hidden_states_shape, *args, **kwargs):
        shape = tuple(hidden_states_shape)
        if not self.token_embedding.built:
            self.token_embedding.build(shape[:-1])
        for layer in self.mtp_layers:
            layer.build(shape, shape)
        # === Weights ===
        # Float32, never autocast: under a mixed policy `call` would
        # otherwise read λ rounded to bfloat16 (0.1 -> 0.10009765625).
        self.loss_scale = self.add_weight(
            name="loss_scaling_factor",
            shape=(),
            initializer=keras.initializers.Constant(self.loss_scaling_factor),
            trainable=False,
            autocast=False,
        )
        self.built = True

    def call(
        self,
        hidden_states,
        token_ids,
        padding_mask,
        segment_ids=None,
        training=None,
    ):
        check_length(hidden_states.shape[1], self.num_layers)
        hidden = hidden_states  # h^0, (B, T, d)
        # The teacher of `mtp_targets="main"`: the main head's input, h^0.
        teacher = ops.stop_gradient(hidden_states)
        if self.detach_trunk:
            hidden = ops.stop_gradient(hidden)
        kernel = backbones.head_kernel(
            self.token_embedding, detach=self.detach_trunk
        )
        normed = self._depth_chain(
            hidden, token_ids, padding_mask, training, segment_ids
        )
        targets, weights = zip(
            *(
                mtp_ops.mtp_targets_and_weights(
                    token_ids, padding_mask, k, segment_ids
                )
                for k in range(1, self.num_layers + 1)
            )
        )
        if self.loss_chunk_size:
            losses, accuracies, predictions = self._chunked_losses(
                normed, kernel, targets, weights, teacher
            )
        else:
            losses, accuracies, predictions = self._dense_losses(
                normed, kernel, targets, weights, teacher
            )
        # losses, accuracies: (D,); predictions: (D, B, T)
        self.add_loss(ops.cast(self.loss_scale, "float32") * ops.mean(losses))
        weights = ops.stack(weights)  # (D, B, T)
        return {
            "losses": losses,
            "accuracies": accuracies,
            "tokens": ops.sum(weights, axis=(1, 2)),  # (D,)
            "predictions": predictions,
            "weights": weights,
        }

    def _head(self, hidden_states, kernel):
        """The shared output head: logits of `hidden_states` through
        `kernel`."""
        return backbones.apply_head(self.token_embedding, hidden_states, kernel)

    def _depth_chain(
        self, hidden, token_ids, padding_mask, training, segment_ids=None
    ):
        """`Norm_k(h^k)` for `k = 1..D`, each `(B, T, d)`, from `h^0`; with
        `segment_ids`, every block attends within its document only."""
        depths = range(1, self.num_layers + 1)
        attention_mask = positions = None
        if segment_ids is not None:
            attention_mask = backbones.segment_attention_mask(segment_ids)
            block = self.mtp_layers[0].transformer_block
            if "positions" in inspect.signature(block.call).parameters:
                positions = backbones.segment_positions(segment_ids)
        # One lookup for every depth (x[i + k], 0 id beyond the end), so the
        # embedding's gradient is one (V, d) scatter, not one per depth.
        shifted_ids = ops.stack(
            [mtp_ops.roll_and_mask(token_ids, -k) for k in depths]
        )  # (D, B, T)
        embeddings = backbones.embed(
            self.token_embedding,
            shifted_ids,
            scale=self.embedding_scale,
            detach=self.detach_trunk,
        )  # (D, B, T, d)
        normed = []
        for k, layer in zip(depths, self.mtp_layers):
            hidden, hidden_normed = layer(
                hidden,
                embeddings[k - 1],
                padding_mask,
                training=training,
                attention_mask=attention_mask,
                positions=positions,
            )
            normed.append(hidden_normed)  # Norm_k(h^k), (B, T, d)
        return normed

    def _chunked_losses(self, normed, kernel, targets, weights, teacher):
        """`(losses, accuracies, predictions)` of every depth, a chunk of
        `loss_chunk_size` tokens at a time (no `(B, T, V)` logits)."""
        depths = range(1, self.num_layers + 1)
        # All depths in one chunked pass: one (d, V) head gradient. The
        # teacher logits z^0_{i+k} are made per chunk from h^0_{i+k}.
        teachers = None
        if self.mtp_targets == "main":
            teachers = ops.stack(
                [mtp_ops.roll_and_mask(teacher, -k) for k in depths]
            )  # (D, B, T, d)
        return mtp_ops.chunked_cross_entropy(
            ops.stack(normed),
            kernel,
            ops.stack(targets),
            ops.stack(weights),
            self.loss_chunk_size,
            head=self._head,
            teacher_hidden_states=teachers,
            return_predictions=True,
        )

    def _dense_losses(self, normed, kernel, targets, weights, teacher):
        """`(losses, accuracies, predictions)` of every depth from its full
        `(B, T, V)` logits."""
        depths = range(1, self.num_layers + 1)
        distill = self.mtp_targets == "main"
        if distill:  # z^0 under stop-gradient, (B, T, V)
            main_logits = self._head(teacher, ops.stop_gradient(kernel))
        losses, accuracies, predictions = [], [], []
        for k, h, t, w in zip(depths, normed, targets, weights):
            logits = self._head(h, kernel)  # (B, T, V)
            if distill:
                ce = mtp_ops.soft_cross_entropy(
                    logits, mtp_ops.roll_and_mask(main_logits, -k)
                )
                losses.append(mtp_ops.weighted_mean(ce, w))
            else:
                losses.append(mtp_ops.masked_cross_entropy(logits, t, w))
            predictions.append(mtp_ops.top1(logits))
            hits = ops.cast(predictions[-1] == t, "float32")
            accuracies.append(mtp_ops.weighted_mean(hits, w))
        return ops.stack(losses), ops.stack(accuracies), ops.stack(predictions)

    def compute_output_spec(self, hidden_states, *args, **kwargs):
        spec = keras.KerasTensor((self.num_layers,), dtype="float32")
        tokens = (self.num_layers, *hidden_states.shape[:2])
        return {
            "losses": spec,
            "accuracies": spec,
            "tokens": spec,
            "predictions": keras.KerasTensor(tokens, dtype="int32"),
            "weights": keras.KerasTensor(tokens, dtype="float32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "token_embedding": keras.saving.serialize_keras_object(
                    self.token_embedding
                ),
                "transformer_block": self.mtp_layers[
                    0
                ].transformer_block_blueprint,
                "output_norm": self.mtp_layers[0].output_norm_blueprint,
                "num_layers": self.num_layers,
                "loss_scaling_factor": self.loss_scaling_factor,
                "detach_trunk": self.detach_trunk,
                "embedding_scale": self.embedding_scale,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "loss_chunk_size": self.loss_chunk_size,
                "mtp_targets": self.mtp_targets,
                "mtp_init": self.mtp_init,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["token_embedding"] = keras.saving.deserialize_keras_object(
            config["token_embedding"]
        )
        return cls(**config)
