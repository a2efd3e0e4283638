import keras
import numpy as np
from keras import ops

from keras_mtp import backbones
from keras_mtp import hf_mtp
from keras_mtp import inputs as mtp_inputs
from keras_mtp import ops as mtp_ops
from keras_mtp import presets
from keras_mtp import speculative as speculative_lib
from keras_mtp.losses import SparseCrossEntropy
from keras_mtp.mtp_block import MTPBlock
from keras_mtp.mtp_layer import check_mtp_init
from keras_mtp.validation import check_int
from keras_mtp.validation import check_loss_chunk_size
from keras_mtp.validation import check_loss_scaling_factor
from keras_mtp.validation import check_mtp_targets


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

    MTP never runs in `predict`, `export` or a plain `model(x)` call:
    inference cost and outputs are those of the backbone alone, the main
    logits `(B, T, V)`. `mtp_num_layers=0` is exactly the plain causal LM. In
    a training step (`model(x, training=True)`) and in `evaluate`'s step,
    `call` returns instead what `compute_loss` reads: a dict with `"logits"`
    (or `"hidden_states"` `(B, T, d)` with `loss_chunk_size`) and the MTP
    block's outputs prefixed with `"mtp_"` (`"mtp_losses"`,
    `"mtp_accuracies"`, `"mtp_tokens"`, `"mtp_predictions"`,
    `"mtp_weights"`; see `MTPBlock`).

    Metrics, in `fit` and `evaluate`: `loss` (total), `main_loss`, `mtp_loss`
    (unscaled `L_mtp`), `mtp_loss_1 .. mtp_loss_D`, `mtp_accuracy_1 ..
    mtp_accuracy_D` (top-1 of depth k against the data's token `x[i+k+1]`:
    how well the head predicts the data) and `mtp_acceptance_1 ..
    mtp_acceptance_D` (top-1 of depth k equal to the main head's top-1 for
    the same token, `argmax z^0_{i+k}`: what greedy speculative decoding
    accepts when the earlier drafts were accepted). The losses reduce over
    an epoch as Keras reduces `loss` (weighted by batch size), so the epoch
    values keep `loss = main_loss + λ·mtp_loss`; accuracies and acceptances
    are weighted by valid tokens. See docs/objective.md for every
    convention.

    Args:
        backbone: a keras-hub causal backbone (`GPT2Backbone`,
            `LlamaBackbone`, `MistralBackbone`, `GemmaBackbone`,
            `Qwen3Backbone`, `Qwen3MoeBackbone`, `MixtralBackbone`).
        mtp_num_layers: int >= 0. The number of MTP depths `D`.
        mtp_loss_scaling_factor: float >= 0. `λ`. A weight of the model: set
            `model.mtp_loss_scaling_factor = v` (or use
            `keras_mtp.callbacks.MTPLossScheduler`) at any time, no recompile.
        mtp_detach_trunk: bool. If True, no gradient of the MTP loss
            reaches the backbone, embedding or head: the MTP loss trains only
            the MTP layers. The main loss still trains the trunk; set
            `model.backbone.trainable = False` too to train the heads alone.
        loss_chunk_size: int or None. In `fit` and `evaluate`, compute every
            head's loss (main and MTP) over chunks of this many tokens, so no
            `(B, T, V)` logits tensor is made on any backend (large
            vocabularies). Same losses, accuracies and gradients as without.
            The main loss is then the default sparse cross-entropy weighted
            by `sample_weight` and its accuracy is logged as
            `sparse_categorical_accuracy`, both computed from the backbone's
            hidden states: compile with `loss="auto"` and no `metrics` (a
            compiled metric would need the full logits).
        mtp_targets: `"labels"` or `"main"`. What each depth learns: the
            data's token `x[i+k+1]`, or the main head's stop-gradient
            distribution for that token, `softmax(z^0_{i+k})` (distillation
            from the trunk, by soft cross-entropy; same positions and
            weights). `"main"` raises `mtp_acceptance_k` for heads trained
            on a frozen trunk; `mtp_accuracy_k` still counts the data.
        mtp_init: `"random"` or `"identity"`: how fresh depths start (see
            `MTPLayer`). `"identity"` starts each depth as a pass-through
            of the trunk's hidden state, so it predicts what the main head
            predicts (a loss below `log V` on a pretrained trunk, where a
            random depth starts confidently wrong); `from_preset` uses it
            for depths it does not load. Trained weights replace either.
        draft_vocabulary: None, or a list of distinct token ids: the ids
            the depths draft from in speculative decoding (see
            `set_draft_vocabulary`). Saved with the model.
        compile: bool. If True (the default, as keras-hub's tasks), the
            model is compiled with `compile()`'s defaults on construction,
            so a new or loaded model (`from_preset`,
            `keras.saving.load_model`) can evaluate, fit and generate at
            once; call `compile` again to choose otherwise (a `.keras` file
            restores the compile it was saved with).
        **kwargs: `keras.Model` arguments (`name`, `dtype`). The dtype policy
            defaults to the backbone's.

    Inputs: a dict with `token_ids` `(B, T)`, `padding_mask` `(B, T)` and
    optionally `segment_ids` `(B, T)` (packed rows, 0 = padding: each
    document attends only within itself, with its own positions, in the
    backbone and every MTP depth; see `keras_mtp.backbones.call_backbone`;
    not for Qwen3.5, which raises) — what
    `keras_hub`'s `CausalLMPreprocessor` yields as `x`, with `y` the next
    tokens and `sample_weight` the main loss weights. Ids must be integers in
    `[0, vocabulary_size)` and every tensor of the shape of `token_ids`:
    `fit`, `evaluate` and `predict` check arrays and a `tf.data` dataset's
    spec before Keras starts, and `call` checks shapes and dtypes. The ids
    of a Python generator or `PyDataset` are not checked by value (that
    would cost the compiled step): an id out of range gives a NaN loss.

    Example:

    ```python
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=256, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=64, intermediate_dim=128)
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=2)
    model.compile(optimizer="adam")  # compiled with defaults otherwise
    model.fit(x, y, sample_weight=w, epochs=2)
    logits = model.predict(x)  # (B, T, V), MTP does not run
    ```

    Reference:
        DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437, §2.2.
    """

    def __init__(
        self,
        backbone,
        preprocessor=None,
        mtp_num_layers=1,
        mtp_loss_scaling_factor=0.1,
        mtp_detach_trunk=False,
        loss_chunk_size=None,
        mtp_targets="labels",
        mtp_init="random",
        draft_vocabulary=None,
        compile=True,
        **kwargs,
    ):
        backbones.check_backbone(backbone)
        check_mtp_init(mtp_init)
        loss_chunk_size = check_loss_chunk_size(loss_chunk_size)
        check_mtp_targets(mtp_targets)
        mtp_num_layers = check_int(mtp_num_layers, "mtp_num_layers")
        check_loss_scaling_factor(mtp_loss_scaling_factor)
        mtp_inputs.check_preprocessor(
            preprocessor, backbone.vocabulary_size, mtp_num_layers
        )
        kwargs.setdefault("dtype", backbone.dtype_policy)
        super().__init__(**kwargs)

        # === Config ===
        self.mtp_num_layers = mtp_num_layers
        self.initial_mtp_loss_scaling_factor = float(mtp_loss_scaling_factor)
        self.mtp_detach_trunk = bool(mtp_detach_trunk)
        self.loss_chunk_size = loss_chunk_size
        self.mtp_targets = mtp_targets
        self.mtp_init = mtp_init

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.set_draft_vocabulary(draft_vocabulary)
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
                mtp_targets=mtp_targets,
                mtp_init=mtp_init,
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
        self.mtp_depth_acceptance_trackers = [
            keras.metrics.Mean(name=f"mtp_acceptance_{k}")
            for k in range(1, mtp_num_layers + 1)
        ]
        self.main_accuracy_tracker = None
        if loss_chunk_size:
            # Computed in the chunked pass; the name of Keras' metric.
            self.main_accuracy_tracker = keras.metrics.Mean(
                name="sparse_categorical_accuracy"
            )
        self._mtp_in_evaluate = False
        self.built = True
        if compile:
            # keras-hub's `Task(compile=True)`: a new, loaded (`from_preset`,
            # `load_model`) model evaluates, fits and generates at once; a
            # later `compile`, or the one a `.keras` file saved, replaces it.
            self.compile()

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

    @property
    def draft_vocabulary(self):
        """The ids the MTP depths draft from while decoding, int32 `(K,)`,
        or None for the full vocabulary (see `set_draft_vocabulary`)."""
        return self._draft_vocabulary

    def set_draft_vocabulary(self, token_ids):
        """Restricts speculative drafts to `token_ids`, or lifts the
        restriction with None.

        FR-Spec (Zhao et al. 2025): most accepted drafts are frequent
        tokens, so each depth's output head scores only the K most frequent
        ids of the training data (`keras_mtp.speculative.frequent_tokens`)
        instead of all V. The main model still verifies over the full
        vocabulary by the same rules, so `generate`'s output is unchanged
        (greedy: token for token; sampling: in distribution); only a draft
        the sub-vocabulary cannot express is lost. On SmolLM2-135M (V =
        49,152, d = 576) a depth's head is the most of its cost.

        The ids are saved by `save_to_preset` and in `.keras` files (in
        the model's config), and leave training untouched.

        Args:
            token_ids: a 1-D list or array of distinct ids in
                `[0, vocabulary_size)`, or None.
        """
        self._draft_vocabulary = speculative_lib.check_draft_vocabulary(
            token_ids, self.backbone.vocabulary_size
        )

    def call(self, inputs, training=None):
        mtp_inputs.check_structure(inputs)
        token_ids = inputs["token_ids"]
        padding_mask = inputs.get("padding_mask")
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids)
        hidden = backbones.call_backbone(
            self.backbone,
            backbones.backbone_inputs(self.backbone, token_ids, padding_mask),
            inputs.get("segment_ids"),
        )  # (B, T, d)
        if not (training or self._mtp_in_evaluate):
            return self._logits(hidden)  # (B, T, V)
        # A training or evaluation step: what `compute_loss` reads.
        outputs = {}
        if self.loss_chunk_size:
            outputs["hidden_states"] = hidden  # the head runs in chunks
        else:
            outputs["logits"] = self._logits(hidden)
        if self.mtp_block is not None:
            mtp = self.mtp_block(
                hidden,
                token_ids,
                padding_mask,
                segment_ids=inputs.get("segment_ids"),
                training=training,
            )
            outputs.update({f"mtp_{key}": value for key, value in mtp.items()})
        return outputs

    def _logits(self, hidden):
        logits = self.backbone.token_embedding(hidden, reverse=True)
        # Keras' Embedding turns autocast off inside a mixed-precision model,
        # so its reverse matmul runs in float32; give the policy's dtype back.
        return ops.cast(logits, self.compute_dtype)

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids="auto",
        speculative="auto",
        return_stats=False,
        strip_prompt=False,
        sampler=None,
        seed=None,
    ):
        """Decoding with the main model's sampler, the MTP heads drafting.

        Greedy (the default) gives the main model's greedy decoding, token
        for token, with or without speculation (keras-hub's
        `CausalLM.generate` with a greedy sampler on the same backbone).
        A stochastic sampler draws from the sampler's distribution over the
        main model's logits, with or without speculation (drafts accepted
        by Leviathan et al.'s rule). Speculation only saves main forward
        passes. See `keras_mtp.speculative`.

        Args:
            inputs: a prompt string or a list of them (with a
                `preprocessor`; an empty list gives an empty list, without
                a forward pass); or keras-hub's token format, a dict with
                `token_ids` `(B, T)` and `padding_mask` `(B, T)` marking the
                prompts, or prompts of equal length, an int array `(B, T)`
                or `(T,)`.
            max_length: int or None. The total length to generate to (the
                prompts are padded to it); None: the preprocessor's
                `sequence_length` for text, else the inputs' length `T`.
            stop_token_ids: "auto", ints or None. A row stops at the first
                of them it generates; generation ends when every row has
                stopped. "auto": the tokenizer's end token with a
                preprocessor, else None (generate to `max_length`).
            speculative: bool or "auto" (use the MTP heads if there are
                any). With `D` depths, each main forward checks `D` drafts.
            return_stats: if True, also return a dict: `forward_passes`
                (main model passes, the prompt's included), `new_tokens`,
                `tokens_per_forward` (positions filled per main forward in
                each row, up to the row's stop token: 1 without
                speculation), `acceptance` (per depth, the share of its
                drafts accepted when all earlier ones were) and the counts
                behind it, `reached` and `accepted`.
            strip_prompt: bool. If True, return only the generated tokens
                (or text), without the prompt.
            sampler: None (the sampler given to `compile`, else greedy),
                a name (`"greedy"`, `"top_k"`, `"top_p"`, `"random"`) or a
                `keras_hub.samplers.Sampler`, for this call. Speculation
                samples with `GreedySampler`, `RandomSampler`,
                `TopKSampler` and `TopPSampler`.
            seed: int or None. The random draws of a stochastic sampler:
                the same seed gives the same outputs. None: drawn from the
                sampler's own seed generator (keras-hub's behaviour).

        Returns:
            For text, a string (or a list of them, one per prompt). For
            tokens, `{"token_ids": (B, max_length), "padding_mask": (B,
            max_length)}` as NumPy arrays, the mask marking the prompt and
            the generated tokens up to each row's stop token. And the stats
            if asked.
        """
        no_prompts = isinstance(inputs, (list, tuple)) and not inputs
        if no_prompts and self.preprocessor is None:
            raise ValueError(
                "generate() received an empty list: no prompt to continue. "
                "Pass token ids (an int array (B, T) or a dict of `token_ids` "
                "and `padding_mask`), or text with a `preprocessor`. "
                f"Received: {inputs!r}"
            )
        text = mtp_inputs.is_text(inputs) or no_prompts
        if text and self.preprocessor is None:
            raise ValueError(
                "generate() received text but the model has no "
                "`preprocessor`: attach one (`MTPCausalLM(backbone, "
                "preprocessor)` or `from_preset`) or pass token ids. "
                f"Received: {inputs!r:.80}"
            )
        if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
            stop_token_ids = None
            if self.preprocessor is not None:
                tokenizer = self.preprocessor.tokenizer
                stop_token_ids = [tokenizer.end_token_id]
                if hasattr(tokenizer, "end_token2_id"):
                    stop_token_ids.append(tokenizer.end_token2_id)
        prompts = inputs
        if text:
            batch = [inputs] if isinstance(inputs, str) else list(inputs)
            if batch:
                prompts = self.preprocessor.generate_preprocess(
                    batch, sequence_length=max_length
                )
                prompts = {
                    k: ops.convert_to_numpy(v) for k, v in prompts.items()
                }
            else:  # no prompts: no rows, no forward pass, no texts
                length = max_length or self.preprocessor.sequence_length
                empty = np.zeros((0, length), "int32")
                prompts = {"token_ids": empty, "padding_mask": empty}
            max_length = prompts["token_ids"].shape[1]
        if sampler is None:
            sampler = getattr(self, "sampler", None)
        outputs, stats = speculative_lib.generate(
            self,
            prompts,
            max_length,
            stop_token_ids,
            speculative,
            sampler=sampler,
            seed=seed,
        )
        if strip_prompt:
            outputs = mtp_inputs.strip_prompt(outputs, prompts)
        if text and not batch:
            outputs = []
        elif text:
            outputs = mtp_inputs.to_strings(
                self.preprocessor.generate_postprocess(outputs)
            )
            outputs = outputs[0] if isinstance(inputs, str) else outputs
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
        sampler="greedy",
        **kwargs,
    ):
        """Like `keras.Model.compile`, with keras-hub's `CausalLM` defaults.

        `optimizer="auto"` is `Adam(2e-5)`; `loss="auto"` is sparse
        cross-entropy from logits weighted by `sample_weight` (computed
        without a one-hot tensor); `weighted_metrics="auto"` is
        `SparseCategoricalAccuracy`. `sampler` is `generate`'s default, as
        in keras-hub's `CausalLM.compile` (a name or a
        `keras_hub.samplers.Sampler`), but greedy unless given: keras-hub's
        default is `"top_k"`.
        """
        self.sampler = speculative_lib.get_sampler(sampler)
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
            if kwargs.get("metrics") or weighted_metrics not in ("auto", None):
                raise ValueError(
                    "A model with `loss_chunk_size` never builds the full "
                    "logits that compiled metrics read; it logs its main "
                    "accuracy itself. Received: metrics="
                    f"{kwargs.get('metrics')!r}, weighted_metrics="
                    f"{weighted_metrics!r}"
                )
            loss = None
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
        if not isinstance(y_pred, dict):  # logits, from a user's own loop
            y_pred = {"logits": y_pred}
        main_loss = ops.zeros((), "float32")
        main_ids = None  # the main head's top-1 ids, (B, T)
        if "hidden_states" in y_pred:
            main_loss, main_ids = self._chunked_main_loss(
                y_pred["hidden_states"], y, sample_weight
            )
        elif self._compile_loss is not None:
            compiled = self._compile_loss(y, y_pred["logits"], sample_weight)
            if compiled is not None:
                main_loss = ops.cast(compiled, "float32")
        total = main_loss
        if self.losses:  # λ·L_mtp, MoE router losses, regularizers
            extra = [ops.cast(ops.sum(loss), "float32") for loss in self.losses]
            total = total + ops.sum(ops.stack(extra))
        # Every logged loss is weighted by the batch size, as Keras weights
        # `loss`, so the epoch values keep `loss = main_loss + λ·mtp_loss`;
        # accuracies are weighted by their number of valid tokens.
        head_input = y_pred.get("logits", y_pred.get("hidden_states"))
        rows = ops.cast(ops.shape(head_input)[0], "float32")
        self.main_loss_tracker.update_state(main_loss, sample_weight=rows)
        if "mtp_losses" in y_pred:
            losses = ops.cast(y_pred["mtp_losses"], "float32")  # (D,)
            accuracies = ops.cast(y_pred["mtp_accuracies"], "float32")
            tokens = ops.cast(y_pred["mtp_tokens"], "float32")
            if main_ids is None:
                main_ids = mtp_ops.top1(y_pred["logits"])
            acceptances = mtp_ops.masked_acceptance(
                y_pred["mtp_predictions"], main_ids, y_pred["mtp_weights"]
            )  # (D,)
            self.mtp_loss_tracker.update_state(
                ops.mean(losses), sample_weight=rows
            )
            for k in range(self.mtp_num_layers):
                self.mtp_depth_loss_trackers[k].update_state(
                    losses[k], sample_weight=rows
                )
                self.mtp_depth_accuracy_trackers[k].update_state(
                    accuracies[k], sample_weight=tokens[k]
                )
                self.mtp_depth_acceptance_trackers[k].update_state(
                    acceptances[k], sample_weight=tokens[k]
                )
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Compiled metrics read the logits; a chunked step has none, and
        # `compile` then allows no compiled metric.
        if isinstance(y_pred, dict):
            y_pred = y_pred.get("logits")
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def _chunked_main_loss(self, hidden, y, sample_weight):
        """The default compiled loss and accuracy, one chunk at a time:
        `(main_loss, main head's top-1 ids (B, T))`."""
        if y is None:
            raise ValueError(
                "A model with `loss_chunk_size` needs targets `y` in `fit` "
                "and `evaluate`. Received: y=None"
            )
        if sample_weight is None:
            sample_weight = ops.ones(ops.shape(y), "float32")
        embedding = self.backbone.token_embedding
        losses, accuracies, predictions = mtp_ops.chunked_cross_entropy(
            hidden[None],
            backbones.head_kernel(embedding),
            y[None],
            sample_weight[None],
            self.loss_chunk_size,
            head=lambda h, kernel: backbones.apply_head(embedding, h, kernel),
            return_predictions=True,
        )
        weight = ops.sum(ops.cast(sample_weight, "float32"))
        self.main_accuracy_tracker.update_state(accuracies[0], weight)
        # `SparseCrossEntropy`'s reduction: sum(w · CE) / (B · T).
        tokens = ops.cast(ops.size(y), "float32")
        return losses[0] * ops.maximum(weight, 1.0) / tokens, predictions[0]

    def _prepare(
        self, x, y, sample_weight, batch_size, step=True, shuffle=False
    ):
        """Text through the preprocessor into a dataset; anything else
        checked (before Keras starts: on JAX, an error inside the first
        traced step would leave the variables moved out of the model)."""
        if self.preprocessor is not None and mtp_inputs.is_text(x):
            mtp_inputs.check_preprocessor(
                self.preprocessor,
                self.backbone.vocabulary_size,
                self.mtp_num_layers if step else 0,
            )
            x = mtp_inputs.text_dataset(
                self.preprocessor, x, y, sample_weight, batch_size, shuffle
            )
            return x, None, None, None
        mtp_inputs.check_data(
            x,
            y,
            self.backbone.vocabulary_size,
            self.mtp_num_layers if step else 0,
        )
        if mtp_inputs.has_segment_ids(x):
            backbones.check_packing(self.backbone)
        return x, y, sample_weight, batch_size

    def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
        validation = kwargs.get("validation_data")
        split = kwargs.pop("validation_split", None)
        if split and self.preprocessor is not None and mtp_inputs.is_text(x):
            # Keras splits arrays, not datasets: split the texts first, the
            # last `split` share for validation as Keras does.
            texts = [x] if isinstance(x, str) else list(x)
            cut = int(len(texts) * (1 - split))
            x, validation = texts[:cut], texts[cut:]
        elif split:
            kwargs["validation_split"] = split
        if validation is not None:
            if mtp_inputs.is_text(validation) or not isinstance(
                validation, (tuple, list)
            ):
                validation = (validation,)
            vx, vy, vw = keras.utils.unpack_x_y_sample_weight(tuple(validation))
            size = kwargs.get("validation_batch_size") or batch_size
            vx, vy, vw, size = self._prepare(vx, vy, vw, size)
            if size is None:  # text, batched here
                kwargs.pop("validation_batch_size", None)
            kwargs["validation_data"] = keras.utils.pack_x_y_sample_weight(
                vx, vy, vw
            )
        if self.preprocessor is not None and mtp_inputs.is_text(x):
            shuffle = kwargs.pop("shuffle", True)  # done in the dataset
            kwargs["shuffle"] = False
        else:
            shuffle = False
        x, y, sample_weight, batch_size = self._prepare(
            x, y, kwargs.pop("sample_weight", None), batch_size, True, shuffle
        )
        return super().fit(
            x, y, batch_size, *args, sample_weight=sample_weight, **kwargs
        )

    def evaluate(self, x=None, y=None, batch_size=None, *args, **kwargs):
        x, y, sample_weight, batch_size = self._prepare(
            x, y, kwargs.pop("sample_weight", None), batch_size
        )
        return super().evaluate(
            x, y, batch_size, *args, sample_weight=sample_weight, **kwargs
        )

    def predict(self, x, batch_size=None, *args, **kwargs):
        x, _, _, batch_size = self._prepare(x, None, None, batch_size, False)
        return super().predict(x, batch_size, *args, **kwargs)

    def export(self, filepath, format="tf_saved_model", **kwargs):
        """`keras.Model.export` of the inference path: `token_ids` and
        `padding_mask` `(batch, length)` int32 in, main logits `(batch,
        length, V)` out (MTP never runs in an export).

        A `"tf_saved_model"` (reload it with `tf.saved_model.load` and call
        its `serve`) is written on JAX (through jax2tf) and TensorFlow; on
        torch, Keras 3.15 writes one only through torch_xla and for flat
        inputs, so use `format="torch"` (`torch.export`, static shapes).
        Without an `input_signature`, any batch size and length are served;
        on JAX the length is one symbol for both inputs and, for a backbone
        with a learned position table (`Family.learned_positions`: GPT-2,
        OPT), bounded by its `max_sequence_length`, as jax2tf needs to
        slice that table; longer inputs fail when served, as they fail in
        `predict`. On JAX the export has no gradient function (an inference
        path; `jax2tf_kwargs={"with_gradient": True}` keeps one, except with
        that bound: jax2tf converts the gradient without it).
        """
        backend = keras.config.backend()
        if format == "tf_saved_model" and backend == "torch":
            raise ValueError(
                "Keras 3.15 exports a tf_saved_model on torch only through "
                "torch_xla and for a flat list of input specs; MTPCausalLM "
                'takes a dict. Export with format="torch" (torch.export, '
                "static shapes), or on JAX or TensorFlow. Received: "
                f"format={format!r} on the {backend} backend"
            )
        if kwargs.get("input_signature") is None:
            spec = keras.InputSpec(shape=(None, None), dtype="int32")
            kwargs["input_signature"] = [
                {"token_ids": spec, "padding_mask": spec}
            ]
            if backend == "jax":
                kwargs["jax2tf_kwargs"] = self._jax2tf_kwargs(
                    kwargs.get("jax2tf_kwargs")
                )
        return super().export(filepath, format=format, **kwargs)

    def _jax2tf_kwargs(self, given):
        """`export`'s jax2tf arguments for its own `(batch, length)`
        signature (a copy: the caller's dict is left as it was)."""
        options = dict(given or {})
        options.setdefault("with_gradient", False)
        if "polymorphic_shapes" in options:
            return options
        # One (batch, length) for both inputs: jax2tf would give each
        # `None` its own symbol, and attention needs them equal.
        shape = "(batch, length)"
        options["polymorphic_shapes"] = [
            {"token_ids": shape, "padding_mask": shape}
        ]
        limit = getattr(self.backbone, "max_sequence_length", None)
        learned = backbones.family(self.backbone).learned_positions
        if learned and limit is not None:
            # Slicing the position table needs `length <= limit` proven.
            options.setdefault(
                "polymorphic_constraints", (f"length <= {int(limit)}",)
            )
        return options

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """An `MTPCausalLM` from a keras-hub preset.

        The backbone and its preprocessor come from keras-hub's
        `from_preset` (a built-in name, `"kaggle://..."`, `"hf://..."` or a
        local directory; under a `keras.distribution` scope the weights are
        created with its layout). The MTP depths are loaded from the preset
        when it has them (a preset written by `save_to_preset`), freshly
        initialized otherwise; one printed line says which. A preset saved
        with more depths than asked for gives its first ones; with fewer,
        the rest are initialized. The model comes compiled with `compile()`'s
        defaults, as keras-hub's tasks do (`compile=False` to leave it
        uncompiled), so it can evaluate, fit and generate at once.

        Args:
            preset: str. Anything keras-hub's `from_preset` takes.
            load_weights: bool. If False, every weight is initialized.
            **kwargs: `MTPCausalLM` arguments (`mtp_num_layers`,
                `mtp_loss_scaling_factor`, `mtp_detach_trunk`,
                `loss_chunk_size`, `mtp_targets`, `mtp_init`,
                `preprocessor`, `backbone`, `compile`). An MTP setting not
                given is the preset's own (from its `mtp.json`), else the
                constructor's default; one given, None included, is passed
                to the constructor as is. `mtp_init` defaults to
                `"identity"` when the weights are loaded (fresh depths on
                a pretrained trunk start as the main head, not confidently
                wrong), `"random"` with `load_weights=False`.

        Example:

        ```python
        model = keras_mtp.MTPCausalLM.from_preset(
            "gemma3_1b", mtp_num_layers=1)
        model.backbone.trainable = False  # train the MTP heads alone
        model.compile(optimizer=keras.optimizers.Adam(1e-4))
        model.fit(["some text", "more text"], batch_size=8)
        model.generate("def fib(n):", max_length=64)
        model.save_to_preset("./gemma3_1b_mtp")
        ```
        """
        return presets.from_preset(cls, preset, load_weights, **kwargs)

    def save_to_preset(self, preset_dir):
        """Writes a keras-hub preset to the directory `preset_dir`: the
        backbone and preprocessor as keras-hub writes them (so
        `keras_hub.models.Backbone.from_preset` and `CausalLM.from_preset`
        still load the trunk) and the MTP depths and settings
        (`mtp.weights.h5`, `mtp.json`) for `MTPCausalLM.from_preset`.

        Into a directory that already holds a preset, the files written
        replace theirs (as keras-hub's savers do) and no other file is
        touched, except an earlier save's `mtp.weights.h5`, removed when
        this model has no MTP depths: the directory then describes exactly
        the model saved."""
        presets.save_to_preset(self, preset_dir)

    def export_to_transformers(self, path):
        """keras-hub's Hugging Face export of the trunk (and tokenizer, with
        a preprocessor), plus MTP depth 1 as the `mtp.*` tensors where the
        family's own checkpoints carry them (Qwen3.5; see
        `keras_mtp.hf_mtp`). Other families have no Hugging Face layout for
        MTP weights: `save_to_preset` keeps them."""
        task = backbones.causal_lm(self.backbone)
        task.preprocessor = self.preprocessor
        task.export_to_transformers(path)
        if self.mtp_num_layers and hf_mtp.takes_hf_mtp(self.backbone):
            hf_mtp.save_hf_mtp_weights(self, path)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "preprocessor": (
                    None
                    if self.preprocessor is None
                    else keras.saving.serialize_keras_object(self.preprocessor)
                ),
                "mtp_num_layers": self.mtp_num_layers,
                "mtp_loss_scaling_factor": self.initial_mtp_loss_scaling_factor,
                "mtp_detach_trunk": self.mtp_detach_trunk,
                "loss_chunk_size": self.loss_chunk_size,
                "mtp_targets": self.mtp_targets,
                "mtp_init": self.mtp_init,
                "draft_vocabulary": (
                    None
                    if self.draft_vocabulary is None
                    else self.draft_vocabulary.tolist()
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("backbone", "preprocessor"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
