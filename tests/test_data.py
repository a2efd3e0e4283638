"""Tests of `keras_mtp.data` on small text files written to a tmp dir."""

import gc
import json
import os
import re
import weakref

import numpy as np
import pytest

from keras_mtp import data


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """Three files; sorted order is a.txt, b.txt, sub/c.py."""
    write(tmp_path / "corpus" / "a.txt", b"hello world\n")  # 12 bytes
    write(tmp_path / "corpus" / "b.txt", b"xyz")  # 3 bytes
    write(tmp_path / "corpus" / "sub" / "c.py", b"print(1)\n")  # 9 bytes
    return tmp_path / "corpus"


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def stream(files):
    """The concatenated token stream, computed by hand from the bytes."""
    ids = []
    for path in files:
        with open(path, "rb") as f:
            ids += [b + 2 for b in f.read()] + [1]
    return np.array(ids, dtype=np.int32)


def take(dataset, num_batches):
    """The first `num_batches` batches as numpy `(x, y, sample_weight)`."""
    return [
        ({k: v.numpy() for k, v in x.items()}, y.numpy(), w.numpy())
        for x, y, w in dataset.take(num_batches)
    ]


def rows_of(batch):
    """The rows of `T + 1` tokens that a batch was cut from."""
    x, y, _ = batch
    return np.concatenate([x["token_ids"], y[:, -1:]], axis=1)


# 27 tokens, 5 rows of T + 1 = 5 (two tokens left over): small enough that
# batches of 2 cross a pass boundary at step 2.
TOKENS = np.arange(100, 127, dtype=np.uint16)


# === Tokens ===


def test_constants():
    assert (data.PAD_ID, data.SEPARATOR_ID) == (0, 1)
    assert data.VOCABULARY_SIZE == 258
    assert data.vocabulary_size(None) == 258
    assert data.separator_id(None) == 1


def test_tokenize_hand_computed():
    # "A" = 65, "é" = 0xC3 0xA9 in UTF-8; each byte b -> b + 2.
    np.testing.assert_array_equal(data.tokenize("Aé"), [67, 197, 171])
    np.testing.assert_array_equal(data.tokenize(b"\x00\xff"), [2, 257])
    assert data.tokenize("Aé").dtype == np.int32
    assert data.detokenize([67, 197, 171, 1, 0]) == "Aé".encode()


def test_read_file_tokens_appends_separator(corpus):
    tokens = data.read_file_tokens(str(corpus / "b.txt"))
    np.testing.assert_array_equal(tokens, [122, 123, 124, 1])  # x y z <eof>


def test_prepare_tokens_hand_computed(corpus, cache):
    files = data.list_corpus_files(str(corpus))
    tokens = data.prepare_tokens(files, cache)
    # a.txt: "h" = 104 -> 106, ...; b.txt: "xyz" -> 122 123 124; <eof> = 1.
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert len(tokens) == 27 and tokens[0] == 106
    np.testing.assert_array_equal(tokens[12:17], [1, 122, 123, 124, 1])
    np.testing.assert_array_equal(tokens, stream(files))
    assert not tokens.flags.writeable
    name = os.path.basename(tokens.filename)
    assert sorted(os.listdir(cache)) == [name, name + ".json"]


def test_cache_reused_and_invalidated(corpus, cache, monkeypatch):
    files = data.list_corpus_files(str(corpus))
    first = data.prepare_tokens(files, cache)
    mtime = os.stat(first.filename).st_mtime_ns

    def no_reading(*args):
        raise AssertionError("a cached corpus was read again")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_read_bytes", no_reading)
        again = data.prepare_tokens(files, cache)
    assert again.filename == first.filename
    assert os.stat(again.filename).st_mtime_ns == mtime

    write(corpus / "b.txt", b"xyzw")  # changed: size and mtime
    changed = data.prepare_tokens(files, cache)
    assert changed.filename != first.filename
    np.testing.assert_array_equal(changed[13:18], [122, 123, 124, 121, 1])
    assert len(os.listdir(cache)) == 4  # 2 token files, 2 stats; no temporary


def test_prepare_tokens_reads_one_file_at_a_time(corpus, cache, monkeypatch):
    files = data.list_corpus_files(str(corpus))
    alive = []
    tokenize = data._tokenize_bytes

    def tracked(content, tokenizer=None):
        gc.collect()
        assert all(ref() is None for ref in alive), "two files in memory"
        tokens = tokenize(content, tokenizer)
        alive.append(weakref.ref(tokens))
        return tokens

    monkeypatch.setattr(data, "_tokenize_bytes", tracked)
    tokens = data.prepare_tokens(files, cache)
    assert len(alive) == 3 and isinstance(tokens, np.memmap)
    # The dataset maps the same file: the corpus is never loaded.
    monkeypatch.setattr(data, "_read_bytes", None)
    data.make_dataset(files, 4, 2, cache_dir=cache)


def test_prepare_tokens_errors(corpus, cache):
    files = data.list_corpus_files(str(corpus))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.prepare_tokens(files + [str(corpus / "nope.txt")], cache)
    with pytest.raises(OSError, match="sub"):  # a directory: unreadable
        data.prepare_tokens(files + [str(corpus / "sub")], cache)
    assert os.listdir(cache) == []  # no partial or temporary file
    with pytest.raises(ValueError, match="0 tokens"):
        data.prepare_tokens([], cache)


def test_broken_symlink_is_an_error(corpus, cache):
    os.symlink(corpus / "gone.txt", corpus / "link.txt")
    files = data.list_corpus_files(str(corpus))
    assert str(corpus / "link.txt") in files  # not silently skipped
    with pytest.raises(FileNotFoundError, match="link.txt"):
        data.make_dataset(files, 4, batch_size=1, cache_dir=cache)


# === Tokenizers ===


@pytest.fixture
def bpe_files(tmp_path):
    vocabulary = {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġa": 4, "Ċ": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocabulary))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nĠ a\n")
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def test_bpe_tokenizer(bpe_files, tmp_path, cache):
    tokenizer = data.load_tokenizer("bpe:{},{}".format(*bpe_files))
    # No end_token_id: the separator is a new id after the 6 of the vocab.
    assert data.separator_id(tokenizer) == 6
    assert data.vocabulary_size(tokenizer) == 7
    path = write(tmp_path / "t.txt", b"ab a\nb")
    # "ab" -> 3, " a" -> 4, "\n" -> 5, "b" -> 1, then the separator.
    np.testing.assert_array_equal(
        data.read_file_tokens(path, tokenizer), [3, 4, 5, 1, 6]
    )
    tokens = data.prepare_tokens([path], cache, tokenizer)
    np.testing.assert_array_equal(tokens, [3, 4, 5, 1, 6])
    # A second instance of the same tokenizer reuses the token file.
    twin = data.load_tokenizer("bpe:{},{}".format(*bpe_files))
    assert data.prepare_tokens([path], cache, twin).filename == tokens.filename
    bytes_tokens = data.prepare_tokens([path], cache)
    assert bytes_tokens.filename != tokens.filename  # tokenizer in the hash
    assert len(bytes_tokens) == 7


def test_kept_share_recorded_and_binary_corpus_refused(
    bpe_files, tmp_path, cache
):
    tokenizer = data.load_tokenizer("bpe:{},{}".format(*bpe_files))
    # 8 bytes; the vocabulary lacks "x": 6 kept ("ab a\nb"), 2 dropped.
    text = write(tmp_path / "t.txt", b"ab a\nbxx")
    tokens = data.prepare_tokens([text], cache, tokenizer)
    stats = data.token_file_stats(tokens)
    assert stats == dict(tokens=len(tokens), bytes=8, kept_bytes=6)
    assert data.token_file_stats(data.prepare_tokens([text], cache)) == dict(
        tokens=9, bytes=8, kept_bytes=8
    )
    # Random bytes: invalid UTF-8 and characters the vocabulary lacks.
    noise = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8)
    binary = write(tmp_path / "blob.bin", b"ab" + noise.tobytes())
    with pytest.raises(ValueError, match=r"kept \d+\.\d% of the corpus' 410"):
        data.prepare_tokens([text, binary], cache, tokenizer)
    assert not [n for n in os.listdir(cache) if ".tmp" in n]


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = "hello world\nthe world is round\nhello there\n" * 20
    write(tmp_path / "text.txt", text.encode())
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "text.txt"),
        model_prefix=str(tmp_path / "tiny"),
        vocab_size=30,
        model_type="bpe",
        minloglevel=2,
    )
    tokenizer = data.load_tokenizer(str(tmp_path / "tiny.model"))
    assert data.vocabulary_size(tokenizer) == 31
    ids = data.read_file_tokens(str(tmp_path / "text.txt"), tokenizer)
    assert ids[-1] == 30 and ids[:-1].max() < 30
    assert tokenizer.detokenize(ids[:-1]).startswith("hello world")


def test_load_tokenizer_specs_and_errors(tmp_path, bpe_files):
    assert data.load_tokenizer(None) is None
    assert data.load_tokenizer("bytes") is None
    with pytest.raises(FileNotFoundError, match="missing.json"):
        data.load_tokenizer(f"bpe:{tmp_path}/missing.json,{bpe_files[1]}")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        data.load_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="bpe:VOCAB_JSON,MERGES_TXT"):
        data.load_tokenizer("gpt2")


# === Batches ===


def test_windows_shapes_shift_and_separators(corpus, cache):
    files = data.list_corpus_files(str(corpus))
    expected = stream(files)  # 12 + 1 + 3 + 1 + 9 + 1 = 27 tokens
    np.testing.assert_array_equal(np.nonzero(expected == 1)[0], [12, 16, 26])
    ds = data.make_dataset(
        files, 4, batch_size=2, shuffle=False, cache_dir=cache
    )
    x_spec, y_spec, w_spec = ds.element_spec
    assert set(x_spec) == {"token_ids", "padding_mask"}
    assert x_spec["token_ids"].shape == y_spec.shape == w_spec.shape == (2, 4)
    out = take(ds, 4)
    for x, y, w in out:
        assert x["token_ids"].dtype == y.dtype == x["padding_mask"].dtype
        assert y.dtype == np.int32 and w.dtype == np.float32
        np.testing.assert_array_equal(x["padding_mask"], np.ones((2, 4)))
        np.testing.assert_array_equal(w, np.ones((2, 4)))
        # y is x shifted by one: both come from one row of 5 tokens.
        np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])
    rows = np.concatenate([rows_of(batch) for batch in out])
    # 27 // 5 = 5 windows; in order, then again from the start (pass 1).
    windows = expected[:25].reshape(5, 5)
    np.testing.assert_array_equal(rows, windows[[0, 1, 2, 3, 4, 0, 1, 2]])
    # The first separator (end of a.txt, stream index 12) is row 2, index 2.
    assert rows[2][2] == data.SEPARATOR_ID


def test_shuffle_permutes_each_pass():
    ds = data.make_dataset(TOKENS, 4, batch_size=5, seed=3)
    rows = np.stack([rows_of(batch) for batch in take(ds, 4)])  # (4, 5, 5)
    windows = TOKENS[:25].reshape(5, 5)
    orders = []
    for one_pass in rows:  # batch_size = N: one batch is one pass
        order = [int(row[0] - 100) // 5 for row in one_pass]
        np.testing.assert_array_equal(one_pass, windows[order])
        assert sorted(order) == [0, 1, 2, 3, 4]
        orders.append(order)
    assert len({tuple(order) for order in orders}) > 1  # a new order a pass
    again = np.stack(
        [rows_of(b) for b in take(data.make_dataset(TOKENS, 4, 5, 3), 4)]
    )
    np.testing.assert_array_equal(rows, again)  # deterministic
    other = np.stack(
        [rows_of(b) for b in take(data.make_dataset(TOKENS, 4, 5, 4), 4)]
    )
    assert not np.array_equal(rows, other)


def test_example_rows_is_a_permutation_per_pass():
    for n in (1, 2, 7, 1000, 4097):
        for p in (0, 1, 5):
            g = np.arange(p * n, (p + 1) * n)
            rows = np.asarray(data.example_rows(g, n, seed=1))
            np.testing.assert_array_equal(np.sort(rows), np.arange(n))
    far = 10**15 + np.arange(4)  # O(1) memory: any index works
    assert np.asarray(data.example_rows(far, 10**9)).max() < 10**9
    np.testing.assert_array_equal(
        data.example_rows(np.arange(12), 5, shuffle=False),
        [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1],
    )


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_at_any_step_is_exact(shuffle):
    # N = 5 rows, 2 per batch: pass boundaries fall at steps 2, 5, 7.
    uninterrupted = take(
        data.make_dataset(TOKENS, 4, 2, 7, shuffle=shuffle), 12
    )
    for step in (1, 2, 3, 5, 9):
        resumed = take(
            data.make_dataset(TOKENS, 4, 2, 7, step, shuffle=shuffle), 3
        )
        for expected, got in zip(uninterrupted[step:], resumed):
            for a, b in zip(expected, got):
                np.testing.assert_equal(a, b)


def test_shards_make_up_the_global_batch():
    full = take(data.make_dataset(TOKENS, 4, 4, seed=2), 6)
    for num_shards in (2, 4):
        shards = [
            take(data.make_dataset(TOKENS, 4, 4, 2, **shard), 6)
            for shard in [
                dict(num_shards=num_shards, shard_index=i)
                for i in range(num_shards)
            ]
        ]
        for step in range(6):
            parts = [rows_of(shard[step]) for shard in shards]
            assert parts[0].shape == (4 // num_shards, 5)
            np.testing.assert_array_equal(
                np.concatenate(parts), rows_of(full[step])
            )


def test_packing_segment_ids_and_weights():
    # Three documents "5 6", "7", "8 9 10" and the separator 1 after each.
    tokens = np.array([5, 6, 1, 7, 1, 8, 9, 10, 1, 11], dtype=np.uint16)
    ds = data.make_dataset(tokens, 4, 2, shuffle=False, packing=True)
    ((x, y, w),) = take(ds, 1)
    np.testing.assert_array_equal(x["token_ids"], [[5, 6, 1, 7], [8, 9, 10, 1]])
    np.testing.assert_array_equal(y, [[6, 1, 7, 1], [9, 10, 1, 11]])
    # Rows [5 6 1 7 1] and [8 9 10 1 11]: the separator ends its segment.
    np.testing.assert_array_equal(
        x["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1]]
    )
    np.testing.assert_array_equal(x["padding_mask"], np.ones((2, 4)))
    # No loss for 1 -> 7 (row 0) nor 1 -> 11 (row 1): across documents.
    np.testing.assert_array_equal(w, [[1, 1, 0, 1], [1, 1, 1, 0]])
    assert w.dtype == np.float32 and x["segment_ids"].dtype == np.int32
    assert ds.element_spec[0]["segment_ids"].shape == (2, 4)


def test_packing_with_a_tokenizer_separator(bpe_files, tmp_path, cache):
    tokenizer = data.load_tokenizer("bpe:{},{}".format(*bpe_files))
    path = write(tmp_path / "t.txt", b"ab a\nb")  # [3, 4, 5, 1] + [6]
    ds = data.make_dataset(
        [path, path],
        3,
        1,
        shuffle=False,
        packing=True,
        cache_dir=cache,
        tokenizer=tokenizer,
    )
    # Rows [3 4 5 1] and [6 3 4 5]: id 1 is "b" here, 6 the separator.
    (x0, _, w0), (x1, _, w1) = take(ds, 2)
    np.testing.assert_array_equal(x0["segment_ids"], [[1, 1, 1]])
    np.testing.assert_array_equal(w0, [[1, 1, 1]])
    np.testing.assert_array_equal(x1["segment_ids"], [[1, 2, 2]])
    np.testing.assert_array_equal(w1, [[0, 1, 1]])


def test_sequence_too_long(corpus, cache):
    files = data.list_corpus_files(str(corpus))
    with pytest.raises(
        ValueError, match=r"27 tokens.*sequence_length \+ 1 = 28"
    ):
        data.make_dataset(
            files, sequence_length=27, batch_size=1, cache_dir=cache
        )
    data.make_dataset(files, sequence_length=26, batch_size=1, cache_dir=cache)


def test_argument_errors():
    with pytest.raises(ValueError, match="batch_size=6, num_shards=4"):
        data.make_dataset(TOKENS, 4, 6, num_shards=4)
    with pytest.raises(ValueError, match="shard_index=2, num_shards=2"):
        data.make_dataset(TOKENS, 4, 6, num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="sequence_length=0"):
        data.make_dataset(TOKENS, 0, 6)
    with pytest.raises(ValueError, match="start_step=-1"):
        data.make_dataset(TOKENS, 4, 6, start_step=-1)


# === Corpus files ===


def test_list_corpus_files_directory_and_glob(corpus):
    write(corpus / ".git" / "HEAD", b"ref")  # hidden: skipped
    expected = [str(corpus / "a.txt"), str(corpus / "b.txt")]
    expected.append(str(corpus / "sub" / "c.py"))
    assert data.list_corpus_files(str(corpus)) == expected
    assert data.list_corpus_files(str(corpus / "**" / "*.py")) == [
        str(corpus / "sub" / "c.py")
    ]
    assert data.list_corpus_files(str(corpus / "a.txt")) == [expected[0]]


def test_list_corpus_files_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        data.list_corpus_files(missing)
    pattern = str(tmp_path / "*.none")
    with pytest.raises(ValueError, match=r"\*\.none"):
        data.list_corpus_files(pattern)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        data.list_corpus_files(str(tmp_path / "empty"))


def test_empty_corpus_is_named(tmp_path, cache):
    """Files of 0 bytes hold no text: an error that says so and names the
    path, not a division by zero where the share of bytes kept is computed
    (train.py's corpus line)."""
    empty = tmp_path / "empty"
    for name in ("a.txt", "b.txt", "sub/c.py"):
        write(empty / name, b"")
    for path in (str(empty), str(empty / "**" / "*.py")):
        with pytest.raises(ValueError) as error:
            data.list_corpus_files(path)
        assert f"corpus {path} is empty" in str(error.value)
    # Given the files (as make_dataset is), no token file is written.
    files = [str(empty / "a.txt"), str(empty / "sub" / "c.py")]
    where = re.escape(f"2 files under {empty} hold 0 bytes")
    with pytest.raises(ValueError, match=where):
        data.prepare_tokens(files, cache)
    where = re.escape(f"1 file {empty / 'a.txt'} holds 0 bytes")
    with pytest.raises(ValueError, match=where):
        data.make_dataset(files[:1], 4, batch_size=1, cache_dir=cache)
    assert not os.path.exists(cache) or os.listdir(cache) == []
    # One byte is a corpus.
    write(empty / "b.txt", b"x")
    assert len(data.list_corpus_files(str(empty))) == 3


def test_split_files_deterministic_and_non_empty():
    files = [f"f{i:02d}.py" for i in range(40)]
    train, val = data.split_files(files, validation_fraction=0.1, seed=0)
    assert len(val) == 4 and len(train) == 36
    assert sorted(train + val) == files
    assert data.split_files(list(reversed(files)), 0.1, seed=0) == (train, val)
    assert data.split_files(files, 0.1, seed=1) != (train, val)
    # Tiny corpora still give a non-empty split.
    train, val = data.split_files(["a", "b"], validation_fraction=0.01)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match="at least 2 files"):
        data.split_files(["a"])
    with pytest.raises(ValueError, match="validation_fraction"):
        data.split_files(files, validation_fraction=1.0)


def test_module_docstring_example_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", str(tmp_path))
    example = data.__doc__.split("```python")[1].split("```")[0]
    namespace = {}
    exec(example, namespace)
    assert namespace["x"]["token_ids"].shape == (16, 128)


def test_default_corpus_files():
    files = data.default_corpus_files()
    assert len(files) > 100
    assert files == sorted(files)
    assert all(f.endswith(".py") for f in files)
    parts = {p for f in files for p in f.split(os.sep)}
    assert not parts & {"site-packages", "test", "tests"}
    assert data.list_corpus_files() == files


def test_load_corpus_splits_tokenizes_and_pads_the_vocabulary(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for i in range(10):
        (corpus_dir / f"f{i}.txt").write_bytes(bytes([65 + i]) * (50 + i))
    corpus = data.load_corpus(
        str(corpus_dir), None, 0.2, seed=0, cache_dir=str(tmp_path / "c")
    )
    assert corpus.num_files == 10
    assert corpus.vocabulary_size % 64 == 0
    assert corpus.vocabulary_size >= data.vocabulary_size(None)
    assert corpus.num_bytes == sum(50 + i for i in range(10))
    train, val = data.split_files(
        data.list_corpus_files(str(corpus_dir)), 0.2, seed=0
    )
    want = [data.prepare_tokens(s, str(tmp_path / "c")) for s in (train, val)]
    np.testing.assert_array_equal(corpus.train_tokens, want[0])
    np.testing.assert_array_equal(corpus.val_tokens, want[1])
