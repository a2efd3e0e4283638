import keras

from keras_mtp import ops as mtp_ops


@keras.saving.register_keras_serializable(package="keras_mtp")
class SparseCrossEntropy(keras.losses.Loss):
    """Sparse cross-entropy from logits, `logsumexp(z) - z[y]`, in float32.

    Reduces like `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`
    (`sum(w * CE) / (B * T)` with `sample_weight`), so it is a drop-in for it,
    but never builds a one-hot `(B, T, V)` tensor. `MTPCausalLM`'s default
    loss.
    """

    def __init__(self, name="sparse_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return mtp_ops.sparse_cross_entropy(y_pred, y_true)
