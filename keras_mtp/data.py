"""Corpus → batches `(x, y, sample_weight)` for byte-level language models.

Files are read one at a time, tokenized to bytes, joined with an end-of-file
separator and cut into rows of `sequence_length + 1` tokens. Each row becomes
one example exactly as keras-hub's `CausalLMPreprocessor` lays it out:

```
x = {"token_ids": row[:-1], "padding_mask": row[:-1] != PAD_ID}
y = row[1:]
sample_weight = row[1:] != PAD_ID
```

Token ids: `0` is padding, `1` ends a file, byte `b` is `b + 2`.

Example:

```python
files = keras_mtp.data.default_corpus_files()  # the Python standard library
train_files, val_files = keras_mtp.data.split_files(files)
ds = keras_mtp.data.make_dataset(train_files, sequence_length=128,
                                 batch_size=16)
model.fit(ds, steps_per_epoch=100)
```
"""

import glob
import os
import sysconfig

import numpy as np
import tensorflow as tf

PAD_ID = 0
SEPARATOR_ID = 1
BYTE_OFFSET = 2  # byte b has id b + BYTE_OFFSET
VOCABULARY_SIZE = 256 + BYTE_OFFSET  # 258

_EXCLUDED_STDLIB_DIRS = ("site-packages", "test", "tests")


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
        ValueError: nothing matched.
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
    return sorted(files)


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


def read_file_tokens(path):
    """The byte ids of one file followed by `SEPARATOR_ID`, int32.

    Raises:
        OSError: the file cannot be read; the message names it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OSError(f"Cannot read corpus file {path}: {e}") from e
    return np.append(tokenize(data), np.int32(SEPARATOR_ID))


def _file_size(path):
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise OSError(f"Cannot read corpus file {path}: {e}") from e


def _rows(files, row_length, shuffle, seed, repeat):
    """Yields rows of `row_length` token ids, reading one file at a time."""
    rng = np.random.default_rng(seed)
    buffer = np.zeros((0,), dtype=np.int32)
    while True:
        order = rng.permutation(len(files)) if shuffle else range(len(files))
        for i in order:
            buffer = np.concatenate([buffer, read_file_tokens(files[i])])
            num_rows = len(buffer) // row_length
            for start in range(0, num_rows * row_length, row_length):
                yield buffer[start : start + row_length]
            buffer = buffer[num_rows * row_length :]  # the unfinished row
        if not repeat:
            return


def _to_features(row):
    mask = tf.cast(tf.not_equal(row, PAD_ID), "int32")
    x = {"token_ids": row[..., :-1], "padding_mask": mask[..., :-1]}
    y = row[..., 1:]
    sample_weight = tf.cast(mask[..., 1:], "float32")
    return x, y, sample_weight


def make_dataset(
    files,
    sequence_length,
    batch_size,
    shuffle=True,
    seed=0,
    repeat=True,
    shuffle_buffer_size=8192,
):
    """A streaming `tf.data.Dataset` of `(x, y, sample_weight)` batches.

    Files are read lazily, one at a time (in a new seeded order on each pass
    when `shuffle`), and joined with `SEPARATOR_ID` after every file. The
    token stream is cut into consecutive rows of `sequence_length + 1`
    tokens; with `shuffle`, rows pass through a buffer of
    `shuffle_buffer_size` rows, so memory does not grow with the corpus.

    Shapes are static: `x["token_ids"]`, `x["padding_mask"]` (int32) and `y`
    (int32) are `(batch_size, sequence_length)`, `sample_weight` (float32)
    too. A final incomplete row or batch is dropped.

    Args:
        files: list of str. The corpus files.
        sequence_length: int. Tokens per example fed to the model.
        batch_size: int. Examples per batch.
        shuffle: bool. Shuffle the file order and the rows.
        seed: int. Seed of both shuffles; the same seed gives the same
            batches.
        repeat: bool. Loop over the files forever (a new order each pass).
        shuffle_buffer_size: int. Rows held in the shuffle buffer (8192 rows
            of 129 tokens is 4 MB and mixes about 1 MB of text, so a batch
            draws from many files rather than the one being read).

    Returns:
        A `tf.data.Dataset`.

    Raises:
        ValueError: the corpus has fewer than `sequence_length + 1` tokens.
        OSError: a file cannot be read (when the dataset reaches it, or at
            once if it does not exist); the message names it.
    """
    files = list(files)
    if not files:
        raise ValueError("`files` is empty.")
    if sequence_length < 1 or batch_size < 1:
        raise ValueError(
            "`sequence_length` and `batch_size` must be >= 1. Received: "
            f"sequence_length={sequence_length}, batch_size={batch_size}"
        )
    row_length = sequence_length + 1
    # One separator per file. Sizes come from `stat`: nothing is read yet.
    num_tokens = sum(_file_size(path) + 1 for path in files)
    if num_tokens < row_length:
        raise ValueError(
            f"The corpus has {num_tokens} tokens ({len(files)} files), fewer "
            f"than one row of sequence_length + 1 = {row_length} tokens."
        )

    dataset = tf.data.Dataset.from_generator(
        lambda: _rows(files, row_length, shuffle, seed, repeat),
        output_signature=tf.TensorSpec((row_length,), tf.int32),
    )
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer_size, seed=seed)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.map(_to_features, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
