"""Exact tokenization for Hugging Face checkpoints.

keras-hub converts a Hugging Face checkpoint's tokenizer into its own
tokenizer classes, and some conversions are not the checkpoint's tokenizer:
its byte-level BPE tokenizers (Llama 3, Qwen, GPT-2, SmolLM...) ignore
`tokenizer.json`'s pre-tokenizer and apply one fixed split rule, some prepend
a start token the checkpoint's tokenizer does not add, and GPT-2's splits
special tokens written in the text. A model then reads ids it was never
trained on (SmolLM2-135M: 0.733 nats per character of stdlib code with
keras-hub's ids, 0.617 with its own).

`exact_preprocessor(preprocessor, preset)` checks keras-hub's preprocessor
against the checkpoint's `tokenizer.json` read by the `tokenizers` library
(the reference: it is what transformers runs) on a probe text (code with
blank lines and indentation, digits, non-ASCII text, special tokens). Where
the ids agree, keras-hub's tokenizer is kept. Where they differ, the
preprocessor gets an `HFTokenizer`, which tokenizes with `tokenizers` itself,
and one printed line says what differed.

`HFTokenizer` is a keras-hub `Tokenizer`: it runs in keras-hub's
preprocessors eagerly (Python) and inside `tf.data` (through
`tf.py_function`), and saves `tokenizer.json` as its asset, so
`save_to_preset` / `from_preset` and `.keras` files keep it.
"""

import os

import keras
import keras_hub
import numpy as np

TOKENIZER_FILE = "tokenizer.json"

# Code with blank lines, indentation and a trailing-space line, long digit
# runs, contractions, non-ASCII letters and an emoji, CRLF and tabs; special
# tokens of the checkpoint are inserted by `probe_text`.
PROBE = (
    'import os\n\n\nclass Point:\n    """A point."""\n\n'
    "    def __init__(self, x=0, y=1234567):\n        self.x = x  \n"
    "\n        self.y = y\t# it's 3.14159, isn't it?\r\n"
    "    return {'naïve': 'Größe', \"日本語\": [1, 22, 333, 4444]}  \n"
    '    print(f"{x!r:>10}")   ...   😀  \n\n\n'
)


def probe_text(reference):
    """`PROBE` with up to three of the checkpoint's special tokens in it."""
    specials = [
        token.content
        for token in reference.get_added_tokens_decoder().values()
        if token.special
    ][:3]
    return PROBE + " ".join(specials) + "\n" + PROBE


def _to_strings(inputs):
    """`(list of str, batched)` from a string, a list, a NumPy array or a
    TensorFlow string tensor."""
    if isinstance(inputs, str):
        return [inputs], False
    if hasattr(inputs, "numpy"):  # an eager tf.Tensor
        inputs = inputs.numpy()
    if isinstance(inputs, bytes):
        return [inputs.decode("utf-8")], False
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 0:
            return _to_strings(inputs.item())
        inputs = inputs.tolist()
    if isinstance(inputs, (list, tuple)):
        return [
            x.decode("utf-8") if isinstance(x, bytes) else str(x)
            for x in inputs
        ], True
    raise ValueError(
        "Expected a string or a list of strings. "
        f"Received: {type(inputs).__name__}"
    )


def _to_id_lists(inputs):
    """`(list of id lists, batched)` from ids in any form keras-hub's
    tokenizers take: an int, a list, nested lists, an array, a (ragged)
    tensor."""
    if hasattr(inputs, "to_list"):  # tf.RaggedTensor
        return inputs.to_list(), True
    if hasattr(inputs, "numpy") and not isinstance(inputs, np.ndarray):
        inputs = inputs.numpy()
    elif keras.ops.is_tensor(inputs):
        inputs = keras.ops.convert_to_numpy(inputs)
    if isinstance(inputs, (int, np.integer)):
        return [[int(inputs)]], False
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 0:
            return [[int(inputs)]], False
        inputs = inputs.tolist()
    if not inputs or isinstance(inputs[0], (int, np.integer)):
        return [[int(i) for i in inputs]], False
    return [[int(i) for i in row] for row in inputs], True


@keras.saving.register_keras_serializable(package="keras_mtp")
class HFTokenizer(keras_hub.tokenizers.Tokenizer):
    """A keras-hub tokenizer that is a Hugging Face `tokenizer.json`.

    Tokenizes exactly as the `tokenizers` library (and so transformers)
    does, without the special tokens the checkpoint's post-processor adds:
    as with keras-hub's own tokenizers, the preprocessor's packer adds the
    start and end tokens.

    Args:
        tokenizer_json: the path of a `tokenizer.json`, its text, a
            `tokenizers.Tokenizer`, or None (set later by `load_assets`,
            as when loading a preset or a `.keras` file).
        special_tokens: dict `{name: token}`, e.g. `{"start_token":
            "<s>", "end_token": "</s>"}`: each becomes the attributes
            `name` and `name_id`, as in keras-hub's tokenizers. Those named
            `start_token`, `end_token` and `pad_token` are what
            `CausalLMPreprocessor` packs with; a missing `start_token`
            means none is added; all are stripped by `generate`'s
            postprocessing.
        pad_token: the token padding is made of (need not be special);
            None: id 0.
    """

    def __init__(
        self,
        tokenizer_json=None,
        special_tokens=None,
        pad_token=None,
        dtype="int32",
        **kwargs,
    ):
        super().__init__(dtype=dtype, **kwargs)
        self.file_assets = [TOKENIZER_FILE]
        self.special_tokens_config = dict(special_tokens or {})
        self.pad_token = pad_token
        self.start_token_id = None
        self.end_token_id = None
        self.pad_token_id = 0
        self._tokenizer = None
        self.set_tokenizer(tokenizer_json)

    def set_tokenizer(self, tokenizer_json):
        """Sets the `tokenizers.Tokenizer` (see the `tokenizer_json`
        argument) and the special token ids."""
        from tokenizers import Tokenizer

        if tokenizer_json is None:
            self._tokenizer = None
            return
        if isinstance(tokenizer_json, Tokenizer):
            tokenizer = Tokenizer.from_str(tokenizer_json.to_str())
        elif tokenizer_json.lstrip().startswith("{"):
            tokenizer = Tokenizer.from_str(tokenizer_json)
        else:
            tokenizer = Tokenizer.from_file(tokenizer_json)
        # The packer adds start / end tokens; truncation and padding are
        # the preprocessor's.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._special_token_attrs = []
        for name, token in self.special_tokens_config.items():
            self._special_token_attrs.append(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", self.token_to_id(token))
        if self.pad_token is not None:
            self.pad_token_id = self.token_to_id(self.pad_token)

    def _check(self):
        if self._tokenizer is None:
            raise ValueError(
                "This HFTokenizer has no tokenizer.json yet: pass "
                "`tokenizer_json` or load it from a preset."
            )

    @property
    def backend_tokenizer(self):
        """The `tokenizers.Tokenizer` this tokenizer runs."""
        return self._tokenizer

    # === Vocabulary ===

    def vocabulary_size(self):
        self._check()
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocabulary(self):
        self._check()
        vocabulary = self._tokenizer.get_vocab(with_added_tokens=True)
        return sorted(vocabulary, key=vocabulary.get)

    def id_to_token(self, id):
        self._check()
        token = self._tokenizer.id_to_token(int(id))
        if token is None:
            raise ValueError(f"Id {id} is out of the vocabulary.")
        return token

    def token_to_id(self, token):
        self._check()
        id = self._tokenizer.token_to_id(token)
        if id is None:
            raise ValueError(f"Token {token!r} is not in the vocabulary.")
        return id

    # === Tokenize / detokenize ===

    def _encode(self, texts):
        encodings = self._tokenizer.encode_batch(
            texts, add_special_tokens=False
        )
        return [encoding.ids for encoding in encodings]

    def _decode(self, id_lists):
        return self._tokenizer.decode_batch(id_lists, skip_special_tokens=False)

    def tokenize(self, inputs):
        self._check()
        if self._use_tf_workflow():
            return self._tokenize_tf(inputs)
        texts, batched = _to_strings(inputs)
        ids = self._encode(texts)
        if not batched:
            return np.array(ids[0], dtype=self.compute_dtype)
        return ids

    def _tokenize_tf(self, inputs):
        """Inside `tf.data` / a `tf.function`: `tokenizers` through
        `tf.py_function`; a ragged batch, or a dense row for one string."""
        import tensorflow as tf

        inputs = tf.convert_to_tensor(inputs)
        unbatched = inputs.shape.rank == 0
        if unbatched:
            inputs = tf.expand_dims(inputs, 0)

        def encode(strings):
            ids = self._encode([s.decode("utf-8") for s in strings.numpy()])
            flat = np.array([i for row in ids for i in row], np.int32)
            return flat, np.array([len(row) for row in ids], np.int64)

        flat, lengths = tf.py_function(
            encode, [inputs], Tout=[tf.int32, tf.int64]
        )
        flat.set_shape([None])
        lengths.set_shape([None])
        outputs = tf.RaggedTensor.from_row_lengths(flat, lengths)
        outputs = tf.cast(outputs, self.compute_dtype)
        return outputs[0] if unbatched else outputs

    def detokenize(self, inputs):
        self._check()
        if self._use_tf_workflow():
            return self._detokenize_tf(inputs)
        id_lists, batched = _to_id_lists(inputs)
        texts = self._decode(id_lists)
        return texts if batched else texts[0]

    def _detokenize_tf(self, inputs):
        import tensorflow as tf
        from keras_hub.src.utils.tensor_utils import convert_to_ragged_batch

        inputs, unbatched, _ = convert_to_ragged_batch(inputs)

        def decode(flat, lengths):
            flat, lengths = flat.numpy().tolist(), lengths.numpy().tolist()
            rows, start = [], 0
            for length in lengths:
                rows.append(flat[start : start + length])
                start += length
            return np.array(self._decode(rows), dtype=object)

        outputs = tf.py_function(
            decode,
            [tf.cast(inputs.flat_values, tf.int64), inputs.row_lengths()],
            Tout=tf.string,
        )
        outputs.set_shape([None])
        return outputs[0] if unbatched else outputs

    def compute_output_spec(self, input_spec):
        return keras.KerasTensor(
            input_spec.shape + (None,), dtype=self.compute_dtype
        )

    # === Saving ===

    def save_assets(self, dir_path):
        self._check()
        self._tokenizer.save(os.path.join(dir_path, TOKENIZER_FILE))

    def load_assets(self, dir_path):
        self.set_tokenizer(os.path.join(dir_path, TOKENIZER_FILE))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "special_tokens": self.special_tokens_config,
                "pad_token": self.pad_token,
            }
        )
        return config


# === Checking keras-hub's preprocessor against tokenizer.json ===


def tokenizer_json(preset):
    """The local path of the Hugging Face checkpoint `preset`'s
    `tokenizer.json`, or None (not a Hugging Face checkpoint, or none)."""
    from keras_hub.src.utils import preset_utils

    from keras_mtp import hf_config

    if hf_config.hf_config(preset) is None:
        return None
    if not preset_utils.check_file_exists(preset, TOKENIZER_FILE):
        return None
    return preset_utils.get_file(preset, TOKENIZER_FILE)


def added_start_token(reference):
    """The start token the checkpoint's post-processor puts before a text:
    a token, None (nothing), or raises ValueError for other templates."""
    bare = reference.encode("x", add_special_tokens=False).ids
    full = reference.encode("x").ids
    if full == bare:
        return None
    if len(full) == len(bare) + 1 and full[1:] == bare:
        return reference.id_to_token(full[0])
    raise ValueError(
        "The checkpoint's tokenizer adds special tokens other than one start "
        f"token: {full} for the text 'x' (its ids alone: {bare})."
    )


def preprocessor_ids(preprocessor, text):
    """The ids `preprocessor` gives `text` as a prompt (start token
    included, no end token, no padding)."""
    # Room for every id: at most one per byte, plus a start token.
    length = len(text.encode("utf-8")) + 2
    prompt = preprocessor.generate_preprocess([text], sequence_length=length)
    ids = keras.ops.convert_to_numpy(prompt["token_ids"])[0]
    mask = keras.ops.convert_to_numpy(prompt["padding_mask"])[0]
    return ids[mask.astype(bool)].tolist()


def describe_difference(actual, expected, reference):
    """A short account of how `actual` ids differ from `expected` ones."""
    parts = []
    if actual[:1] != expected[:1] and actual[1:2] == expected[:1]:
        parts.append(
            f"adds a start token {reference.id_to_token(actual[0])!r} the "
            "checkpoint's tokenizer does not"
        )
        actual = actual[1:]
    if actual != expected:
        first = next(
            (i for i, (a, b) in enumerate(zip(actual, expected)) if a != b),
            min(len(actual), len(expected)),
        )
        piece = reference.decode(expected[first : first + 3])
        count = f"{len(actual)} ids instead of {len(expected)}"
        if len(actual) == len(expected):
            count = "other ids"
        parts.append(
            f"gives {count}, the first different one at position {first} "
            f"({piece!r})"
        )
    return "; ".join(parts)


def exact_tokenizer(tokenizer, reference):
    """An `HFTokenizer` of the `tokenizers.Tokenizer` `reference` that keeps
    keras-hub `tokenizer`'s end and padding tokens (what training packs
    with) and takes the start token from the checkpoint."""
    special = {}
    for name in getattr(tokenizer, "_special_token_attrs", []):
        token = getattr(tokenizer, name)
        if name != "start_token" and reference.token_to_id(token) is not None:
            special[name] = token
    start = added_start_token(reference)
    if start is not None:
        special["start_token"] = start
    pad_token = None
    if getattr(tokenizer, "pad_token_id", None) is not None:
        pad_token = reference.id_to_token(int(tokenizer.pad_token_id))
    return HFTokenizer(reference, special_tokens=special, pad_token=pad_token)


def exact_preprocessor(preprocessor, preset):
    """`preprocessor` if it tokenizes as the Hugging Face checkpoint
    `preset`'s `tokenizer.json` does on a probe text; otherwise the same
    preprocessor with an `HFTokenizer` (printing one line that says what
    differed). Presets that are not Hugging Face checkpoints, or have no
    `tokenizer.json`, keep their preprocessor."""
    path = tokenizer_json(preset)
    if preprocessor is None or path is None:
        return preprocessor
    if isinstance(preprocessor.tokenizer, HFTokenizer):
        return preprocessor
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print(
            "keras_mtp: the `tokenizers` package is not installed: keras-hub's "
            f"tokenizer of {preset!r} is not checked against its "
            "tokenizer.json"
        )
        return preprocessor
    reference = Tokenizer.from_file(path)
    probe = probe_text(reference)
    expected = reference.encode(probe).ids
    actual = preprocessor_ids(preprocessor, probe)
    if actual == expected:
        return preprocessor
    name = type(preprocessor.tokenizer).__name__
    difference = describe_difference(actual, expected, reference)
    exact = exact_tokenizer(preprocessor.tokenizer, reference)
    config = preprocessor.get_config()
    config.update(
        tokenizer=exact,
        add_start_token=exact.start_token_id is not None,
    )
    exact_one = type(preprocessor).from_config(config)
    print(
        f"keras_mtp: keras-hub's {name} differs from the tokenizer.json of "
        f"{preset!r} (on a probe text it {difference}): using keras_mtp's "
        "HFTokenizer, "
        "which runs tokenizer.json through the `tokenizers` library"
    )
    return exact_one
