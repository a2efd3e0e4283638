"""Corpus → batches `(x, y, sample_weight)`, resumable at any step.

Two stages, nanoGPT style:

1. `prepare_tokens` tokenizes the corpus once, one file at a time, into one
   flat token file on disk (every file is followed by a separator id) and
   memory-maps it. A rerun on unchanged files reuses the file.
2. `make_dataset` cuts the tokens into `N = len(tokens) // (T + 1)` fixed,
   non-overlapping rows of `T + 1` tokens and serves batches by random
   access: example `g = step * batch_size + j` is row `perm_p(g mod N)`,
   where pass `p = g // N` has its own seeded pseudo-random permutation. A
   batch is a pure function of `(seed, step)`: restarting with
   `start_step=s` gives exactly the batches an uninterrupted run sees from
   step `s` on, nothing is held in memory but the batches in flight, and
   `num_shards` processes can each take their slice of every global batch.

Each row becomes one example laid out as keras-hub's `CausalLMPreprocessor`
does it:

```
x = {"token_ids": row[:-1], "padding_mask": ones}
y = row[1:]
sample_weight = ones
```

Byte token ids (the default, `tokenizer=None`): `0` is padding (never
produced here, kept for models that pad), `1` ends a file, byte `b` is
`b + 2`.

Example:

```python
from keras_mtp import data

files = data.default_corpus_files()  # the Python standard library
train_files, val_files = data.split_files(files)
ds = data.make_dataset(train_files, sequence_length=128, batch_size=16)
x, y, sample_weight = next(iter(ds))  # x["token_ids"]: (16, 128) int32
# model.fit(ds, steps_per_epoch=100)  # any keras-hub causal LM

# A run killed after 700 steps continues with batch 700, as if never stopped:
resumed = data.make_dataset(train_files, 128, 16, start_step=700)
```
"""

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
import typing

import numpy as np
import tensorflow as tf

PAD_ID = 0
SEPARATOR_ID = 1
BYTE_OFFSET = 2  # byte b has id b + BYTE_OFFSET
VOCABULARY_SIZE = 256 + BYTE_OFFSET  # 258

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "keras_mtp", "tokens")
_CACHE_FORMAT = 2  # bump when the token file layout changes
# A corpus of which a tokenizer keeps less than this share of the bytes (a
# binary corpus, or text in a script the vocabulary lacks) is refused.
MIN_KEPT_SHARE = 0.5
_EXCLUDED_STDLIB_DIRS = ("site-packages", "test", "tests")


# === Corpus files ===


def default_corpus_files():
    """The `.py` files of the running Python's standard library, sorted.

    Directories named `site-packages`, `test` and `tests` are left out (the
    test suites hold large generated data files). Nothing else is filtered:
    a file that cannot be read fails later, naming itself.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]
        files.extend(
            os.path.join(dirpath, name)
            for name in filenames
            if name.endswith(".py")
        )
    if not files:
        raise ValueError(f"No `.py` files found in the standard library {root}")
    return sorted(files)


def _is_glob(path):
    return any(char in path for char in "*?[")


def list_corpus_files(path_or_glob=None):
    """Lists the files of a corpus, sorted.

    Args:
        path_or_glob: str or None. None is `default_corpus_files()`. A
            directory gives every file below it, recursively (names starting
            with `.`, such as `.git`, are skipped); pass a glob such as
            `"src/**/*.py"` to choose which files. A glob gives its matches
            (`**` matches any depth); matched directories are left out.

    Returns:
        A sorted list of file paths.

    Raises:
        FileNotFoundError: `path_or_glob` is not a glob and does not exist.
        ValueError: nothing matched, or every file is empty (0 bytes).
    """
    if path_or_glob is None:
        return default_corpus_files()
    path = os.path.expanduser(os.fspath(path_or_glob))
    if os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files.extend(
                os.path.join(dirpath, name)
                for name in filenames
                if not name.startswith(".")
            )
    elif _is_glob(path):
        matches = glob.glob(path, recursive=True)
        files = [match for match in matches if not os.path.isdir(match)]
    elif os.path.lexists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"Corpus path not found: {path_or_glob}")
    if not files:
        raise ValueError(f"No corpus files found for: {path_or_glob}")
    if all(_size(file) == 0 for file in files):
        raise ValueError(
            f"The corpus {path_or_glob} is empty: its {len(files)} file(s) "
            "hold 0 bytes."
        )
    return sorted(files)


def _size(path):
    """The size of `path` in bytes, or None if it cannot be read (such a
    file fails where it is read, naming itself)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _describe(files):
    """`1 file PATH holds` / `N files under DIR hold`, for messages."""
    if len(files) == 1:
        return f"1 file {files[0]} holds"
    where = os.path.commonpath([os.path.abspath(file) for file in files])
    return f"{len(files)} files under {where} hold"


def split_files(files, validation_fraction=0.05, seed=0):
    """Splits files into training and validation files, deterministically.

    The sorted files are shuffled with `seed`, and the first
    `max(1, round(validation_fraction * len(files)))` go to validation, so
    the split depends only on the set of files and the seed.

    Args:
        files: list of str. At least 2 files.
        validation_fraction: float in (0, 1). The share of validation files.
        seed: int. The shuffle seed.

    Returns:
        `(train_files, validation_files)`: two non-empty sorted lists.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(
            "`validation_fraction` must be in (0, 1). Received: "
            f"validation_fraction={validation_fraction}"
        )
    files = sorted(files)
    if len(files) < 2:
        raise ValueError(
            "Need at least 2 files to split into training and validation. "
            f"Received: {len(files)} file(s)"
        )
    order = np.random.default_rng(seed).permutation(len(files))
    num_validation = round(validation_fraction * len(files))
    num_validation = min(max(num_validation, 1), len(files) - 1)
    validation = sorted(files[i] for i in order[:num_validation])
    train = sorted(files[i] for i in order[num_validation:])
    return train, validation


# === Tokenizers ===


def tokenize(data):
    """Byte ids of `data` (bytes or str, str is UTF-8 encoded), int32."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + BYTE_OFFSET


def detokenize(token_ids):
    """The bytes of `token_ids`; padding and separators are dropped."""
    token_ids = np.asarray(token_ids).reshape(-1)
    token_ids = token_ids[token_ids >= BYTE_OFFSET]
    return (token_ids - BYTE_OFFSET).astype(np.uint8).tobytes()


def load_tokenizer(spec=None):
    """A tokenizer from local vocabulary files; None means bytes.

    Nothing is downloaded. The tokenizer's own ids are used as they are;
    `separator_id` says which id ends each file.

    Args:
        spec: str or None. One of:
            - None or `"bytes"`: byte tokens (`tokenize`); returns None.
            - a path ending in `.model`: a SentencePiece model, loaded as
              `keras_hub.tokenizers.SentencePieceTokenizer`.
            - `"bpe:VOCAB_JSON,MERGES_TXT"`: a GPT-2 style byte-pair
              vocabulary and merges file, loaded as
              `keras_hub.tokenizers.BytePairTokenizer`.

    Returns:
        None (bytes) or a keras-hub tokenizer.

    Raises:
        FileNotFoundError: a named file does not exist.
        ValueError: `spec` has none of the forms above.
    """
    if spec is None or spec == "bytes":
        return None
    import keras_hub

    def existing(path):
        path = os.path.expanduser(path.strip())
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer file not found: {path}")
        return path

    if spec.startswith("bpe:") and spec.count(",") == 1:
        vocabulary, merges = spec[len("bpe:") :].split(",")
        return keras_hub.tokenizers.BytePairTokenizer(
            vocabulary=existing(vocabulary), merges=existing(merges)
        )
    if spec.endswith(".model"):
        return keras_hub.tokenizers.SentencePieceTokenizer(proto=existing(spec))
    raise ValueError(
        'Expected a tokenizer spec None, "bytes", a path to a SentencePiece '
        '`.model` file, or "bpe:VOCAB_JSON,MERGES_TXT". '
        f"Received: spec={spec!r}"
    )


def separator_id(tokenizer=None):
    """The id that ends every file in the token stream.

    `SEPARATOR_ID` for bytes; the tokenizer's `end_token_id` if it has one
    (keras-hub's model tokenizers do); otherwise a new id,
    `tokenizer.vocabulary_size()`, one past the tokenizer's vocabulary.
    """
    if tokenizer is None:
        return SEPARATOR_ID
    end_token_id = getattr(tokenizer, "end_token_id", None)
    if end_token_id is not None:
        return int(end_token_id)
    return int(tokenizer.vocabulary_size())


def vocabulary_size(tokenizer=None):
    """The model's vocabulary size: every token id and the separator."""
    if tokenizer is None:
        return VOCABULARY_SIZE
    return max(int(tokenizer.vocabulary_size()), separator_id(tokenizer) + 1)


def _tokenizer_identity(tokenizer):
    """A string that changes whenever the tokenizer's ids could."""
    if tokenizer is None:
        return "bytes"
    digest = hashlib.sha256()
    config = dict(tokenizer.get_config())
    config.pop("name", None)  # "tokenizer_2" for the same vocabulary
    config = json.dumps(config, sort_keys=True, default=str)
    digest.update(f"{type(tokenizer).__qualname__}\n{config}".encode())
    for attribute in ("proto", "vocabulary", "merges"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, str) and os.path.isfile(value):
            with open(value, "rb") as f:
                value = f.read()
        elif isinstance(value, dict):
            value = sorted(value.items())
        if value is not None:
            digest.update(f"{attribute}\n".encode())
            if not isinstance(value, bytes):
                value = repr(value).encode()
            digest.update(value)
    digest.update(str(separator_id(tokenizer)).encode())
    return digest.hexdigest()


# === Tokens on disk ===


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(f"Cannot read corpus file {path}: {e}") from e


def _tokenize_bytes(data, tokenizer):
    if tokenizer is None:
        return tokenize(data)
    text = data.decode("utf-8", errors="replace")
    return np.asarray(tokenizer.tokenize(text), dtype=np.int32).reshape(-1)


def kept_bytes(data, ids, tokenizer=None):
    """How many of the bytes `data` survive tokenization into `ids`.

    The UTF-8 length of `tokenizer.detokenize(ids)` without U+FFFD (what
    invalid bytes decode to), at most `len(data)`. A tokenizer drops the
    characters its vocabulary lacks, so a binary file keeps few bytes; byte
    tokens keep all of them.
    """
    if tokenizer is None:
        return len(data)
    text = tokenizer.detokenize(np.asarray(ids, dtype=np.int32))
    if not isinstance(text, str):  # a tf string tensor
        text = np.asarray(text).item().decode("utf-8", errors="replace")
    return min(len(data), len(text.replace("\ufffd", "").encode("utf-8")))


def read_file_tokens(path, tokenizer=None):
    """The token ids of one file followed by the separator, int32.

    With a tokenizer, the bytes are decoded as UTF-8 (invalid bytes become
    U+FFFD) before tokenizing.

    Raises:
        OSError: the file cannot be read; the message names it.
    """
    ids = _tokenize_bytes(_read_bytes(path), tokenizer)
    return np.append(ids, np.int32(separator_id(tokenizer)))


def _token_dtype(tokenizer):
    return np.uint16 if vocabulary_size(tokenizer) <= 2**16 else np.uint32


def _cache_path(files, cache_dir, tokenizer):
    """The token file's path: a hash of what its content depends on."""
    stats = []
    for path in files:
        try:
            stat = os.stat(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Corpus file not found: {path}") from e
        except OSError as e:
            raise OSError(f"Cannot read corpus file {path}: {e}") from e
        stats.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    dtype = np.dtype(_token_dtype(tokenizer)).name
    key = [_CACHE_FORMAT, dtype, _tokenizer_identity(tokenizer), stats]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, f"tokens-{digest}.{dtype}")


def _append_file_tokens(out, path, tokenizer, dtype, size):
    """Writes one file's tokens to `out`; returns `(tokens, bytes, kept
    bytes)`. The file is freed on return: one file is in memory at a time."""
    data = _read_bytes(path)
    ids = _tokenize_bytes(data, tokenizer)
    kept = kept_bytes(data, ids, tokenizer)
    ids = np.append(ids, np.int32(separator_id(tokenizer)))
    if len(ids) and (ids.min() < 0 or ids.max() >= size):
        raise ValueError(
            f"Token ids of {path} fall outside [0, {size}): "
            f"[{ids.min()}, {ids.max()}]"
        )
    out.write(ids.astype(dtype).tobytes())
    return len(ids), len(data), kept


def token_file_stats(tokens):
    """What `prepare_tokens` recorded about a token file: a dict with
    `tokens`, `bytes` (of the corpus files) and `kept_bytes` (the bytes the
    tokenizer kept, `kept_bytes`)."""
    with open(tokens.filename + ".json") as f:
        return json.load(f)


def prepare_tokens(files, cache_dir, tokenizer=None):
    """Tokenizes `files` into one flat token file and memory-maps it.

    Files are read, tokenized and appended one at a time (each followed by
    `separator_id(tokenizer)`), so memory does not grow with the corpus.
    The token file, `uint16` (`uint32` past 65536 ids), is named by a hash
    of the files' absolute paths, sizes and modification times and of the
    tokenizer, so a rerun on the same corpus reuses it and any change
    writes a new one (old ones are not deleted). It is written under a
    temporary name and renamed, so a killed run or a concurrent process
    never leaves a partial file behind. Beside it, `<token file>.json`
    records the token and byte counts (`token_file_stats`).

    A tokenizer silently drops the characters its vocabulary lacks, so a
    binary corpus would become almost no tokens: a corpus of which less
    than `MIN_KEPT_SHARE` (half) of the bytes survive (`kept_bytes`) is
    refused.

    Args:
        files: list of str. The corpus files, in order.
        cache_dir: str. Directory of the token files (created if needed).
        tokenizer: None (bytes) or a keras-hub tokenizer (`load_tokenizer`).

    Returns:
        A read-only 1-D `np.memmap` of token ids.

    Raises:
        FileNotFoundError: a file does not exist; the message names it.
        OSError: a file cannot be read; the message names it.
        ValueError: the corpus has no tokens or no bytes (empty files),
            or the tokenizer keeps less than half of its bytes.
    """
    files = [os.fspath(path) for path in files]
    path = _cache_path(files, os.path.expanduser(cache_dir), tokenizer)
    dtype = _token_dtype(tokenizer)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        size = vocabulary_size(tokenizer)
        temporary = f"{path}.tmp{os.getpid()}"
        try:
            counts = np.zeros(3, dtype=np.int64)  # tokens, bytes, kept
            with open(temporary, "wb") as out:
                for file in files:
                    counts += _append_file_tokens(
                        out, file, tokenizer, dtype, size
                    )
            num_tokens, num_bytes, num_kept = (int(n) for n in counts)
            if num_tokens == 0:
                raise ValueError(
                    f"The corpus has 0 tokens ({len(files)} files): nothing "
                    "to train on."
                )
            if num_bytes == 0:  # only separators: no text at all
                raise ValueError(
                    f"The corpus is empty: {_describe(files)} 0 bytes, "
                    "nothing to train on."
                )
            if num_kept < MIN_KEPT_SHARE * num_bytes:
                raise ValueError(
                    f"The tokenizer kept {num_kept / num_bytes:.1%} of the "
                    f"corpus' {num_bytes:,} bytes ({len(files)} files; less "
                    f"than {MIN_KEPT_SHARE:.0%}): a binary corpus, or text "
                    "its vocabulary lacks. Use --tokenizer=bytes or another "
                    "tokenizer."
                )
            stats = dict(
                tokens=num_tokens, bytes=num_bytes, kept_bytes=num_kept
            )
            with open(temporary + ".json", "w") as f:
                json.dump(stats, f)
            os.replace(temporary + ".json", path + ".json")
            os.replace(temporary, path)
        finally:
            for leftover in (temporary, temporary + ".json"):
                if os.path.exists(leftover):
                    os.remove(leftover)
    return np.memmap(path, dtype=dtype, mode="r")


# === Batches ===


@dataclasses.dataclass
class Corpus:
    """A tokenized corpus: the token files of its training and validation
    files, and what the model needs to know of the tokenizer."""

    num_files: int
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    tokenizer: typing.Any
    vocabulary_size: int  # the tokenizer's, padded to a multiple of 64
    kept_bytes: int
    num_bytes: int


def load_corpus(
    path_or_glob=None,
    tokenizer=None,
    validation_fraction=0.05,
    seed=0,
    cache_dir=".token_cache",
):
    """`list_corpus_files`, `split_files` and `prepare_tokens` in one call.

    Args:
        path_or_glob: str or None. The corpus (None: the Python standard
            library's `.py` files).
        tokenizer: str or None. A `load_tokenizer` spec (None: bytes).
        validation_fraction: float in (0, 1). Share of files for validation.
        seed: int. Seed of the split.
        cache_dir: str. Where the token files are written (once).

    Returns:
        `Corpus`, its vocabulary size padded to a multiple of 64 (as nanoGPT
        does) so that it divides any model-parallel mesh axis; the extra
        ids never occur in the data.
    """
    tokenizer = load_tokenizer(tokenizer)
    files = list_corpus_files(path_or_glob)
    splits = split_files(files, validation_fraction, seed=seed)
    tokens = [prepare_tokens(split, cache_dir, tokenizer) for split in splits]
    stats = [token_file_stats(t) for t in tokens]
    return Corpus(
        num_files=len(files),
        train_tokens=tokens[0],
        val_tokens=tokens[1],
        tokenizer=tokenizer,
        vocabulary_size=64 * -(-vocabulary_size(tokenizer) // 64),
        kept_bytes=sum(s["kept_bytes"] for s in stats),
        num_bytes=sum(s["bytes"] for s in stats),
    )


def example_rows(indices, num_rows, seed=0, shuffle=True):
    """Row of each global example index: `perm_p(g mod N)`, `p = g // N`.

    `perm_p` is TensorFlow's stateless index shuffle (`RandomIndexShuffle`,
    the op behind `tf.random.experimental.index_shuffle`) permutation of
    `range(N)` drawn from the seed `(seed, p)`: O(1) memory for any `N`, a
    new order each pass, the same order on every run and process.

    Args:
        indices: 1-D int tensor or array. Global example indices
            `g = step * batch_size + j`.
        num_rows: int. `N`, the rows of the corpus.
        seed: int. With the pass `p`, seeds each pass's permutation.
        shuffle: bool. False gives row `g mod N`.

    Returns:
        An int64 tensor of row numbers in `[0, N)`, shaped like `indices`.
    """
    indices = tf.cast(indices, "int64")
    passes, rows = indices // num_rows, indices % num_rows
    if not shuffle:
        return rows
    # One seed per index, `(seed, p, 0)`, given to the raw op:
    # `tf.random.experimental.index_shuffle` turns an `[n, 2]` seed into
    # `[n + 1, 2]`, not `[n, 3]` (TF 2.21).
    seeds = tf.stack(
        [tf.fill(tf.shape(passes), tf.cast(seed, "int64")), passes, 0 * passes],
        axis=-1,
    )
    max_index = tf.fill(tf.shape(rows), tf.cast(num_rows - 1, "int64"))
    return tf.raw_ops.RandomIndexShuffle(
        index=rows, seed=seeds, max_index=max_index, rounds=4
    )


def _to_features(rows, packing, separator):
    """`(x, y, sample_weight)` from rows of `T + 1` token ids (b, T + 1)."""
    token_ids, y = rows[:, :-1], rows[:, 1:]  # (b, T) each
    ones = tf.ones_like(token_ids)
    x = {"token_ids": token_ids, "padding_mask": ones}
    sample_weight = tf.cast(ones, "float32")
    if packing:
        # A separator belongs to the file it ends: segments start after it.
        ends = tf.cast(tf.equal(rows, separator), "int32")  # (b, T + 1)
        segment_ids = 1 + tf.cumsum(ends, axis=1, exclusive=True)
        x["segment_ids"] = segment_ids[:, :-1]
        # No loss for predicting across a boundary: row[i] is a separator.
        sample_weight = tf.cast(1 - ends[:, :-1], "float32")
    return x, y, sample_weight


def _check_dataset_arguments(
    sequence_length, batch_size, seed, start_step, num_shards, shard_index
):
    if sequence_length < 1 or batch_size < 1:
        raise ValueError(
            "`sequence_length` and `batch_size` must be >= 1. Received: "
            f"sequence_length={sequence_length}, batch_size={batch_size}"
        )
    if num_shards < 1 or batch_size % num_shards:
        raise ValueError(
            "`batch_size` must be a multiple of `num_shards` (each shard "
            f"takes an equal slice). Received: batch_size={batch_size}, "
            f"num_shards={num_shards}"
        )
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            "`shard_index` must be in [0, num_shards). Received: "
            f"shard_index={shard_index}, num_shards={num_shards}"
        )
    if seed < 0 or start_step < 0:
        raise ValueError(
            "`seed` and `start_step` must be >= 0. Received: "
            f"seed={seed}, start_step={start_step}"
        )


def make_dataset(
    files_or_tokens,
    sequence_length,
    batch_size,
    seed=0,
    start_step=0,
    shuffle=True,
    packing=False,
    num_shards=1,
    shard_index=0,
    cache_dir=None,
    tokenizer=None,
):
    """An infinite, resumable `tf.data.Dataset` of `(x, y, sample_weight)`.

    The tokens (from `prepare_tokens`) are cut into `N = len(tokens) //
    (sequence_length + 1)` non-overlapping rows, `row r = tokens[r * (T + 1)
    : (r + 1) * (T + 1)]` (the last `len(tokens) mod (T + 1)` tokens are
    never used). Global example `g = step * batch_size + j` is row
    `perm_p(g mod N)` of pass `p = g // N`: every pass visits every row
    once, in an order drawn from `(seed, p)` (`example_rows`). The dataset is
    `Dataset.counter(start_step)` mapped to each step's row numbers and through
    a `tf.numpy_function` that gathers those rows from the memory map, then
    prefetched.

    Shapes are static: `x["token_ids"]`, `x["padding_mask"]` and `y` are
    int32 `(batch_size // num_shards, sequence_length)`, `sample_weight` is
    float32 of the same shape. Rows never contain padding, so
    `padding_mask` is all ones. Without `packing`, `sample_weight` is all
    ones too (the separator is an ordinary token). With `packing`,
    `x["segment_ids"]` (int32) numbers the files inside each row from 1
    (a separator belongs to the file it ends), and `sample_weight` is 0
    where `x` holds a separator: the next token starts another file.

    Args:
        files_or_tokens: list of str, or a 1-D integer array of token ids
            (such as `prepare_tokens`' memory map).
        sequence_length: int. `T`, the tokens per example fed to the model.
        batch_size: int. Examples per global batch (all shards together).
        seed: int >= 0. Seed of the row order; same seed, same batches.
        start_step: int. The first batch is batch `start_step` of the run:
            pass the number of steps already trained to resume exactly.
        shuffle: bool. False takes rows in order, `g mod N`.
        packing: bool. Add `segment_ids`: `MTPCausalLM` then keeps the
            files apart (no attention, loss or position across a file
            boundary).
        num_shards: int. Processes sharing each global batch.
        shard_index: int in `[0, num_shards)`. This process keeps rows
            `[i * b / P, (i + 1) * b / P)` of every global batch, so the
            shards together are exactly the `num_shards=1` batch. With
            `keras.distribution` across processes, pass
            `jax.process_count()` and `jax.process_index()` and build the
            distribution with `auto_shard_dataset=False`.
        cache_dir: str or None. Where `prepare_tokens` keeps token files;
            None is `DEFAULT_CACHE_DIR` (`~/.cache/keras_mtp/tokens`).
        tokenizer: None (bytes) or a keras-hub tokenizer
            (`load_tokenizer`). Also gives the separator for `packing`.

    Returns:
        A `tf.data.Dataset` of infinite cardinality.

    Raises:
        ValueError: the corpus is shorter than one row (the message gives
            both lengths), `batch_size` does not divide by `num_shards`, or
            an argument is out of range.
        FileNotFoundError: a file does not exist; the message names it.
        OSError: a file cannot be read; the message names it.
    """
    _check_dataset_arguments(
        sequence_length, batch_size, seed, start_step, num_shards, shard_index
    )
    if isinstance(files_or_tokens, np.ndarray):
        tokens = files_or_tokens.reshape(-1)
    else:
        if isinstance(files_or_tokens, (str, os.PathLike)):
            files_or_tokens = [files_or_tokens]
        cache_dir = DEFAULT_CACHE_DIR if cache_dir is None else cache_dir
        tokens = prepare_tokens(files_or_tokens, cache_dir, tokenizer)

    row_length = sequence_length + 1
    num_rows = len(tokens) // row_length
    if num_rows == 0:
        raise ValueError(
            f"The corpus has {len(tokens)} tokens, fewer than one row of "
            f"sequence_length + 1 = {row_length} tokens."
        )
    rows = tokens[: num_rows * row_length].reshape(num_rows, row_length)
    local_batch = batch_size // num_shards
    offsets = shard_index * local_batch + np.arange(local_batch)

    def gather(chosen):  # (local_batch,) row numbers -> (local_batch, T + 1)
        return rows[chosen].astype(np.int32)

    def to_batch(step):
        chosen = example_rows(
            step * batch_size + offsets, num_rows, seed, shuffle
        )
        batch = tf.numpy_function(gather, [chosen], tf.int32, stateful=False)
        batch.set_shape((local_batch, row_length))
        return _to_features(batch, packing, separator_id(tokenizer))

    # One background thread: a batch takes about a millisecond to gather, so
    # more threads (or tf.data's autotuner) would only take CPU from the
    # model: on 2 cores they cost a few % of the step time (bench_input.py).
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    dataset = tf.data.Dataset.counter(start_step).map(to_batch)
    return dataset.prefetch(2).with_options(options)
