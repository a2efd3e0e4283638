import keras
from keras import ops

from keras_mtp import backbones
from keras_mtp import ops as mtp_ops
from keras_mtp.losses import SparseCrossEntropy
from keras_mtp.mtp_block import MTPBlock
from keras_mtp.mtp_block import check_loss_chunk_size
from keras_mtp.mtp_block import check_loss_scaling_factor


@keras.saving.register_keras_serializable(package="keras_mtp")
class MTPCausalLM(keras.Model):
    """A keras-hub causal backbone trained with Multi-Token Prediction.

    The main head gives next-token logits exactly as keras-hub's `CausalLM`
    does (`backbone.token_embedding(backbone(x), reverse=True)`). During `fit`
    and `evaluate`, an `MTPBlock` of `mtp_num_layers` depths also predicts the
    tokens 2, 3, ... ahead from the backbone's hidden state and adds
    `mtp_loss_scaling_factor * L_mtp`, so

    ```
    loss = main_loss + λ · (1 / D) Σ_k L_k
    ```

    MTP never runs in `predict` or a plain `model(x)` call: inference cost and
    outputs are those of the backbone alone. `mtp_num_layers=0` is exactly
    the plain causal LM.

    Metrics, in `fit` and `evaluate`: `loss` (total), `main_loss`, `mtp_loss`
    (unscaled `L_mtp`), `mtp_loss_1 .. mtp_loss_D` and `mtp_accuracy_1 ..
    mtp_accuracy_D` (top-1 of depth k: the teacher-forced draft acceptance).

    Args:
        backbone: a keras-hub causal backbone (`GPT2Backbone`,
            `LlamaBackbone`, `MistralBackbone`, `GemmaBackbone`,
            `Qwen3Backbone`, `Qwen3MoeBackbone`, `MixtralBackbone`).
        mtp_num_layers: int >= 0. The number of MTP depths `D`.
        mtp_loss_scaling_factor: float >= 0. `λ`. A weight of the model: set
            `model.mtp_loss_scaling_factor = v` (or use
            `keras_mtp.callbacks.MTPLossScheduler`) at any time, no recompile.
        mtp_detach_trunk: bool. If True, the MTP loss trains only the MTP
            layers: no gradient of it reaches the backbone, embedding or head.
        loss_chunk_size: int or None. In `fit` and `evaluate`, compute every
            head's loss (main and MTP) over chunks of this many tokens with
            rematerialization, so no `(B, T, V)` logits tensor lives (large
            vocabularies). Same losses, accuracies and gradients as without.
            The main loss is then the default sparse cross-entropy weighted
            by `sample_weight` and its accuracy is logged as
            `sparse_categorical_accuracy`, both computed from the backbone's
            hidden states: compile with `loss="auto"` and leave
            `weighted_metrics="auto"` (a metric that reads `y_pred` would
            bring the full logits back).
        **kwargs: `keras.Model` arguments (`name`, `dtype`). The dtype policy
            defaults to the backbone's.

    Inputs: a dict with `token_ids` `(B, T)`, `padding_mask` `(B, T)` and
    optionally `segment_ids` `(B, T)` (packed rows, 0 = padding) — what
    `keras_hub`'s `CausalLMPreprocessor` yields as `x`, with `y` the next
    tokens and `sample_weight` the main loss weights.

    Example:

    ```python
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=256, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=64, intermediate_dim=128)
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=2)
    model.compile(optimizer="adam")
    model.fit(x, y, sample_weight=w, epochs=2)
    logits = model.predict(x)  # (B, T, V), MTP does not run
    ```

    Reference:
        DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437, §2.2.
    """

    def __init__(
        self,
        backbone,
        mtp_num_layers=1,
        mtp_loss_scaling_factor=0.1,
        mtp_detach_trunk=False,
        loss_chunk_size=None,
        **kwargs,
    ):
        backbones.check_backbone(backbone)
        check_loss_chunk_size(loss_chunk_size)
        if not isinstance(mtp_num_layers, int) or mtp_num_layers < 0:
            raise ValueError(
                "`mtp_num_layers` must be an int >= 0. Received: "
                f"mtp_num_layers={mtp_num_layers!r}"
            )
        check_loss_scaling_factor(mtp_loss_scaling_factor)
        kwargs.setdefault("dtype", backbone.dtype_policy)
        super().__init__(**kwargs)

        # === Config ===
        self.mtp_num_layers = mtp_num_layers
        self.initial_mtp_loss_scaling_factor = float(mtp_loss_scaling_factor)
        self.mtp_detach_trunk = bool(mtp_detach_trunk)
        self.loss_chunk_size = loss_chunk_size

        # === Layers ===
        self.backbone = backbone
        self.mtp_block = None
        if mtp_num_layers > 0:
            self.mtp_block = MTPBlock(
                token_embedding=backbone.token_embedding,
                transformer_block=backbones.decoder_blueprint(backbone),
                output_norm=backbones.final_norm_blueprint(backbone),
                num_layers=mtp_num_layers,
                loss_scaling_factor=mtp_loss_scaling_factor,
                detach_trunk=mtp_detach_trunk,
                embedding_scale=backbones.embedding_scale(backbone),
                layer_norm_epsilon=backbones.layer_norm_epsilon(backbone),
                loss_chunk_size=loss_chunk_size,
                dtype=self.dtype_policy,
                name="mtp_block",
            )
            # Every MTP variable must exist before `fit` builds the optimizer:
            # `fit`'s symbolic build calls with training=False, which skips MTP.
            self.mtp_block.build((None, None, backbone.hidden_dim))

        # === Metrics ===
        self.main_loss_tracker = keras.metrics.Mean(name="main_loss")
        self.mtp_loss_tracker = None
        if mtp_num_layers > 0:
            self.mtp_loss_tracker = keras.metrics.Mean(name="mtp_loss")
        self.mtp_depth_loss_trackers = [
            keras.metrics.Mean(name=f"mtp_loss_{k}")
            for k in range(1, mtp_num_layers + 1)
        ]
        self.mtp_depth_accuracy_trackers = [
            keras.metrics.Mean(name=f"mtp_accuracy_{k}")
            for k in range(1, mtp_num_layers + 1)
        ]
        self.main_accuracy_tracker = None
        if loss_chunk_size:
            # Computed in the chunked pass; the name of Keras' metric.
            self.main_accuracy_tracker = keras.metrics.Mean(
                name="sparse_categorical_accuracy"
            )
        self._mtp_in_evaluate = False
        self._loss_hidden = None  # the main head's input, in chunked steps
        self.built = True

    @property
    def mtp_loss_scaling_factor(self):
        """The current `λ`, a float (0.0 when `mtp_num_layers == 0`)."""
        if self.mtp_block is None:
            return 0.0
        return float(ops.convert_to_numpy(self.mtp_block.loss_scale))

    @mtp_loss_scaling_factor.setter
    def mtp_loss_scaling_factor(self, value):
        check_loss_scaling_factor(value)
        if self.mtp_block is None:
            raise ValueError(
                "Cannot set the MTP loss scaling factor of a model with "
                f"mtp_num_layers=0. Received: {value!r}"
            )
        self.mtp_block.loss_scale.assign(float(value))

    def call(self, inputs, training=None):
        if not isinstance(inputs, dict) or "token_ids" not in inputs:
            received = type(inputs).__name__
            if isinstance(inputs, dict):
                received += f" with keys {sorted(inputs)}"
            raise ValueError(
                "MTPCausalLM expects a dict with `token_ids` and "
                "`padding_mask` (and optionally `segment_ids`). Received: "
                f"{received}"
            )
        token_ids = inputs["token_ids"]
        padding_mask = inputs.get("padding_mask")
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids)
        hidden = self.backbone(
            {"token_ids": token_ids, "padding_mask": padding_mask}
        )  # (B, T, d)
        logits = self.backbone.token_embedding(hidden, reverse=True)
        # Keras' Embedding turns autocast off inside a mixed-precision model,
        # so its reverse matmul runs in float32; give the policy's dtype back.
        logits = ops.cast(logits, self.compute_dtype)
        in_step = training or self._mtp_in_evaluate
        if self.loss_chunk_size and in_step:
            # `compute_loss` of this same step reads it; the logits returned
            # below are then unused, and XLA drops them.
            self._loss_hidden = hidden
        if self.mtp_block is not None and in_step:
            self.mtp_block(
                hidden,
                token_ids,
                padding_mask,
                segment_ids=inputs.get("segment_ids"),
                training=training,
            )
        return logits  # (B, T, V)

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids=None,
        speculative="auto",
        return_stats=False,
    ):
        """Greedy decoding, with the MTP heads as drafters.

        The output is the main model's greedy decoding, token for token,
        with or without speculation (keras-hub's `CausalLM.generate` with a
        greedy sampler on the same backbone); speculation only saves main
        forward passes. See `keras_mtp.speculative`.

        Args:
            inputs: keras-hub's format, a dict with `token_ids` `(B, T)` and
                `padding_mask` `(B, T)` marking the prompts; or prompts of
                equal length, an int array `(B, T)` or `(T,)`.
            max_length: int or None. The total length to generate to (the
                inputs are padded to it); None: the inputs' length `T`.
            stop_token_ids: ints or None. A row stops at the first of them
                it generates; generation ends when every row has stopped.
            speculative: bool or "auto" (use the MTP heads if there are
                any). With `D` depths, each main forward checks `D` drafts.
            return_stats: if True, also return a dict: `forward_passes`
                (main model steps after the prompt), `new_tokens`,
                `tokens_per_forward` (positions filled per main forward: 1
                without speculation) and `acceptance` (per depth, the share
                of its drafts accepted when all earlier ones were).

        Returns:
            `{"token_ids": (B, max_length), "padding_mask": (B, max_length)}`
            as NumPy arrays, the mask marking the prompt and the generated
            tokens up to each row's stop token; and the stats if asked.
        """
        from keras_mtp import speculative as speculative_lib

        outputs, stats = speculative_lib.generate(
            self, inputs, max_length, stop_token_ids, speculative
        )
        return (outputs, stats) if return_stats else outputs

    def test_step(self, *args, **kwargs):
        # `evaluate` calls with training=False like `predict`; the flag is read
        # while the step is traced, so MTP runs in evaluate and never predict.
        self._mtp_in_evaluate = True
        try:
            return super().test_step(*args, **kwargs)
        finally:
            self._mtp_in_evaluate = False

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        **kwargs,
    ):
        """Like `keras.Model.compile`, with keras-hub's `CausalLM` defaults.

        `optimizer="auto"` is `Adam(2e-5)`; `loss="auto"` is sparse
        cross-entropy from logits weighted by `sample_weight` (computed
        without a one-hot tensor); `weighted_metrics="auto"` is
        `SparseCategoricalAccuracy`.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        if self.loss_chunk_size:
            if not (
                loss in ("auto", None) or isinstance(loss, SparseCrossEntropy)
            ):
                raise ValueError(
                    "A model with `loss_chunk_size` computes its main loss "
                    "from hidden states in chunks: compile it with "
                    f'loss="auto". Received: loss={loss!r}'
                )
            loss = None
            if weighted_metrics == "auto":
                weighted_metrics = None  # accuracy comes from the chunks
        if loss == "auto":
            loss = SparseCrossEntropy()
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            **kwargs,
        )

    def compile_from_config(self, config):
        # Keras skips an overridden `compile` when loading; ours takes the same
        # arguments, so a loaded model is compiled and its optimizer restored.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        main_loss = ops.zeros((), "float32")
        if self._loss_hidden is not None:
            main_loss = self._chunked_main_loss(y, sample_weight)
        elif self._compile_loss is not None:
            compiled = self._compile_loss(y, y_pred, sample_weight)
            if compiled is not None:
                main_loss = ops.cast(compiled, "float32")
        total = main_loss
        if self.losses:  # λ·L_mtp, MoE router losses, regularizers
            extra = [ops.cast(ops.sum(loss), "float32") for loss in self.losses]
            total = total + ops.sum(ops.stack(extra))
        self.main_loss_tracker.update_state(main_loss)
        if self.mtp_block is not None:
            depth_losses = ops.cast(self.mtp_block.depth_losses, "float32")
            accuracies = ops.cast(self.mtp_block.depth_accuracies, "float32")
            self.mtp_loss_tracker.update_state(ops.mean(depth_losses))
            for k in range(self.mtp_num_layers):
                self.mtp_depth_loss_trackers[k].update_state(depth_losses[k])
                self.mtp_depth_accuracy_trackers[k].update_state(accuracies[k])
        return total

    def _chunked_main_loss(self, y, sample_weight):
        """The default compiled loss and accuracy, one chunk at a time."""
        hidden, self._loss_hidden = self._loss_hidden, None
        if y is None:
            raise ValueError(
                "A model with `loss_chunk_size` needs targets `y` in `fit` "
                "and `evaluate`. Received: y=None"
            )
        if sample_weight is None:
            sample_weight = ops.ones(ops.shape(y), "float32")
        embedding = self.backbone.token_embedding
        losses, accuracies = mtp_ops.chunked_cross_entropy(
            hidden[None],
            backbones.head_kernel(embedding),
            y[None],
            sample_weight[None],
            self.loss_chunk_size,
            head=lambda h, kernel: backbones.apply_head(embedding, h, kernel),
        )
        weight = ops.sum(ops.cast(sample_weight, "float32"))
        self.main_accuracy_tracker.update_state(accuracies[0], weight)
        # `SparseCrossEntropy`'s reduction: sum(w · CE) / (B · T).
        tokens = ops.cast(ops.size(y), "float32")
        return losses[0] * ops.maximum(weight, 1.0) / tokens

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "mtp_num_layers": self.mtp_num_layers,
                "mtp_loss_scaling_factor": self.initial_mtp_loss_scaling_factor,
                "mtp_detach_trunk": self.mtp_detach_trunk,
                "loss_chunk_size": self.loss_chunk_size,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(
            config["backbone"]
        )
        return cls(**config)
