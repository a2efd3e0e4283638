"""Checks of `MTPCausalLM`'s inputs, made before a compiled step sees them.

A bad batch must cost one clear error, never a silently wrong loss: ids out of
range give NaN losses (JAX clamps or wraps them), float ids truncate, a
`segment_ids` of another shape broadcasts. Inside a traced step only shapes
and dtypes are known, and on JAX an error raised there comes after `fit` has
moved the model's variables out; so `fit`, `evaluate` and `predict` check
whole arrays (NumPy, lists, tensors) and the static spec of a `tf.data`
dataset (of token ids, or of strings: batched) before Keras starts. Python
generators and `PyDataset`s are checked batch by batch by `call` (shapes and
dtypes only).
"""

import sys

import keras
import numpy as np

KEYS = ("token_ids", "padding_mask", "segment_ids")


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def _same_shape(a, b):
    """Equal where both dimensions are known ints (an export traces with
    symbolic ones)."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(
        not (isinstance(i, int) and isinstance(j, int)) or i == j
        for i, j in zip(a, b)
    )


def check_structure(inputs):
    """Shapes and dtypes of a batch dict: what a traced step can check."""
    if not isinstance(inputs, dict) or "token_ids" not in inputs:
        received = type(inputs).__name__
        if isinstance(inputs, dict):
            received += f" with keys {sorted(inputs)}"
        raise ValueError(
            "MTPCausalLM expects a dict with `token_ids` and `padding_mask` "
            f"(and optionally `segment_ids`). Received: {received}"
        )
    token_ids = inputs["token_ids"]
    if len(token_ids.shape) != 2:
        raise ValueError(
            "`token_ids` must have shape (batch, length). Received: shape="
            f"{tuple(token_ids.shape)}"
        )
    for key in KEYS:
        value = inputs.get(key)
        if value is None:
            continue
        if key != "padding_mask" and not (
            _dtype(value).startswith("int") or _dtype(value).startswith("uint")
        ):
            raise ValueError(
                f"`{key}` must be integers. Received: dtype={_dtype(value)}"
            )
        if not _same_shape(value.shape, token_ids.shape):
            raise ValueError(
                f"`{key}` must have the shape of `token_ids`, "
                f"{tuple(token_ids.shape)}. Received: {key} of shape "
                f"{tuple(value.shape)}"
            )


def check_length(length, mtp_num_layers):
    """Depth `k` predicts the token `k + 1` ahead: `T >= D + 2`."""
    if mtp_num_layers and length is not None and length < mtp_num_layers + 2:
        raise ValueError(
            f"MTP with num_layers={mtp_num_layers} needs sequences of at least "
            f"num_layers + 2 = {mtp_num_layers + 2} tokens (depth k predicts "
            f"the token k + 1 ahead). Received: sequence length {length}"
        )


def check_ids(name, ids, vocabulary_size):
    """Every id of the NumPy array `ids` lies in `[0, vocabulary_size)`."""
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocabulary_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"`{name}` must hold ids in [0, vocabulary_size={vocabulary_size})"
            f". Received: an id {bad}"
        )


def _as_array(value):
    if value is None or isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)) or keras.ops.is_tensor(value):
        return np.asarray(keras.ops.convert_to_numpy(value))
    return None  # not an array: left to the step


def check_data(x, y, vocabulary_size, mtp_num_layers):
    """Checks what `fit`, `evaluate` or `predict` were given, before Keras
    starts: whole arrays by value, a `tf.data.Dataset` by its spec."""
    if _is_dataset(x):
        spec = x.element_spec
        spec = spec[0] if isinstance(spec, tuple) else spec
        if isinstance(spec, dict):
            check_structure(spec)
            check_length(spec["token_ids"].shape[-1], mtp_num_layers)
        return
    if isinstance(x, (np.ndarray, list)) or keras.ops.is_tensor(x):
        check_structure(x)  # raises: a dict is needed
    if not isinstance(x, dict):
        return  # a generator or a PyDataset: `call` checks each batch
    arrays = {key: _as_array(x.get(key)) for key in KEYS}
    if arrays["token_ids"] is None:
        return
    check_structure({k: v for k, v in arrays.items() if v is not None})
    check_length(arrays["token_ids"].shape[1], mtp_num_layers)
    check_ids("token_ids", arrays["token_ids"], vocabulary_size)
    y = _as_array(y)
    if y is not None:
        if not _dtype(y).startswith(("int", "uint")):
            raise ValueError(
                f"`y` must be integer token ids. Received: dtype={_dtype(y)}"
            )
        check_ids("y", y, vocabulary_size)


def has_segment_ids(x):
    """Whether `x` (a batch dict, or a `tf.data.Dataset` by its spec)
    carries `segment_ids`: packed rows."""
    if _is_dataset(x):
        x = x.element_spec
        x = x[0] if isinstance(x, tuple) else x
    return isinstance(x, dict) and x.get("segment_ids") is not None


def _is_dataset(x):
    tf = sys.modules.get("tensorflow")  # a dataset means it is imported
    return tf is not None and isinstance(x, tf.data.Dataset)


# === Strings, through a keras-hub preprocessor ===


def check_preprocessor(preprocessor, vocabulary_size, mtp_num_layers):
    """A keras-hub `CausalLMPreprocessor` whose ids fit the backbone and
    whose sequences are long enough for `mtp_num_layers` depths: the
    tokenizer-driven path checked once, never per batch."""
    if preprocessor is None:
        return
    import keras_hub

    if not isinstance(preprocessor, keras_hub.models.CausalLMPreprocessor):
        raise ValueError(
            "`preprocessor` must be a keras-hub `CausalLMPreprocessor` or "
            f"None. Received: {type(preprocessor).__name__}"
        )
    try:
        size = preprocessor.tokenizer.vocabulary_size()
    except ValueError:  # loading a saved model: assets come after init
        size = 0
    if size > vocabulary_size:
        raise ValueError(
            f"The tokenizer has {size} ids but the backbone's embedding only "
            f"{vocabulary_size}: its ids would be out of range. Received: a "
            f"tokenizer of vocabulary_size={size}"
        )
    check_length(preprocessor.sequence_length, mtp_num_layers)


def is_text(x):
    """Whether `x` is text for a preprocessor: a string, a list or array of
    strings, or a `tf.data.Dataset` whose elements start with strings."""
    if isinstance(x, str):
        return True
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(isinstance(v, str) for v in x)
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "USO"
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    if isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        spec = spec[0] if isinstance(spec, tuple) else spec
        return getattr(spec, "dtype", None) == tf.string
    return isinstance(x, tf.Tensor) and x.dtype == tf.string


def text_dataset(
    preprocessor, x, y=None, sample_weight=None, batch_size=None, shuffle=False
):
    """`x` (strings, or a batched `tf.data.Dataset` of them, checked by
    `check_text_dataset`) as batches of `preprocessor` outputs, `(x, y,
    sample_weight)`, as keras-hub's tasks
    feed their `fit`. A `CausalLMPreprocessor` makes `y` and
    `sample_weight` from the text itself. `shuffle` reshuffles a list of
    strings every epoch, as Keras' `fit` does with arrays."""
    if y is not None or sample_weight is not None:
        raise ValueError(
            "With a preprocessor, text is its own target: pass the strings "
            "alone. Received: y and/or sample_weight as well"
        )
    if not _is_dataset(x):
        texts = [x] if isinstance(x, str) else [str(t) for t in x]
        return TextBatches(preprocessor, texts, batch_size or 32, shuffle)
    import tensorflow as tf

    check_text_dataset(x)
    if batch_size is not None:
        raise ValueError(
            "A tf.data.Dataset is already batched: do not pass "
            f"`batch_size`. Received: batch_size={batch_size}"
        )
    return x.map(preprocessor, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE
    )


def check_text_dataset(dataset):
    """A `tf.data.Dataset` of strings must yield batches, 1-D string
    tensors: single strings would reach the compiled step as `(T,)` rows,
    and on JAX an error raised there leaves the model unusable. Checked on
    the static spec (an unknown rank passes)."""
    spec = dataset.element_spec
    spec = spec[0] if isinstance(spec, tuple) else spec
    if spec.shape.rank is not None and spec.shape.rank != 1:
        raise ValueError(
            "A tf.data.Dataset of strings must be batched: each element a "
            "1-D tensor of strings (`dataset.batch(batch_size)`). Received: "
            f"elements of shape {tuple(spec.shape)}"
        )


class TextBatches(keras.utils.PyDataset):
    """Batches of a list of strings through a preprocessor, run eagerly.

    Not a `tf.data` map: a traced map holds the tokenizer's TensorFlow
    resource (SentencePiece), which `keras.utils.set_random_seed` destroys
    when it clears TensorFlow's caches. The order is reshuffled every epoch
    with NumPy's global generator (which `set_random_seed` seeds).
    """

    def __init__(self, preprocessor, texts, batch_size, shuffle):
        super().__init__()
        self.preprocessor = preprocessor
        self.texts = texts
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.order = np.arange(len(texts))
        self.on_epoch_end()

    def __len__(self):
        return -(-len(self.texts) // self.batch_size)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size :][: self.batch_size]
        batch = self.preprocessor([self.texts[i] for i in rows])
        return keras.tree.map_structure(
            lambda t: np.asarray(keras.ops.convert_to_numpy(t)), batch
        )

    def on_epoch_end(self):
        if self.shuffle:
            self.order = np.random.permutation(len(self.texts))


def to_strings(texts):
    """A preprocessor's detokenized output as a list of Python strings."""
    if hasattr(texts, "numpy"):
        texts = texts.numpy()
    texts = np.asarray(texts, dtype=object).reshape(-1)
    return [
        t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts
    ]


def strip_prompt(outputs, prompts):
    """`generate`'s outputs without the prompt tokens: each row's generated
    tokens moved to the front, the rest padding (keras-hub's
    `strip_prompt`)."""
    token_ids = np.asarray(outputs["token_ids"])
    new = np.asarray(outputs["padding_mask"], bool) & ~np.asarray(
        keras.ops.convert_to_numpy(prompts["padding_mask"]), bool
    )
    stripped = np.zeros_like(token_ids)
    mask = np.zeros_like(new)
    for row, keep in enumerate(new):
        count = int(keep.sum())
        stripped[row, :count] = token_ids[row, keep]
        mask[row, :count] = True
    return {"token_ids": stripped, "padding_mask": mask}
