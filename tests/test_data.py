"""Tests of `keras_mtp.data` on small text files written to a tmp dir."""

import os

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
    write(tmp_path / "a.txt", b"hello world\n")  # 12 bytes
    write(tmp_path / "b.txt", b"xyz")  # 3 bytes
    write(tmp_path / "sub" / "c.py", b"print(1)\n")  # 9 bytes
    return tmp_path


def batches(dataset):
    """`(x, y, sample_weight)` batches as numpy arrays."""
    return [
        ({k: v.numpy() for k, v in x.items()}, y.numpy(), w.numpy())
        for x, y, w in dataset
    ]


def stream(files):
    """The concatenated token stream, computed by hand from the bytes."""
    ids = []
    for path in files:
        with open(path, "rb") as f:
            ids += [b + 2 for b in f.read()] + [1]
    return np.array(ids, dtype=np.int32)


def test_constants():
    assert (data.PAD_ID, data.SEPARATOR_ID) == (0, 1)
    assert data.VOCABULARY_SIZE == 258


def test_tokenize_hand_computed():
    # "A" = 65, "é" = 0xC3 0xA9 in UTF-8; each byte b -> b + 2.
    np.testing.assert_array_equal(data.tokenize("Aé"), [67, 197, 171])
    np.testing.assert_array_equal(data.tokenize(b"\x00\xff"), [2, 257])
    assert data.tokenize("Aé").dtype == np.int32
    assert data.detokenize([67, 197, 171, 1, 0]) == "Aé".encode()


def test_read_file_tokens_appends_separator(corpus):
    tokens = data.read_file_tokens(str(corpus / "b.txt"))
    np.testing.assert_array_equal(tokens, [122, 123, 124, 1])  # x y z <eof>


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


def test_windows_shapes_shift_and_separators(corpus):
    files = data.list_corpus_files(str(corpus))
    expected = stream(files)  # 12 + 1 + 3 + 1 + 9 + 1 = 27 tokens
    assert len(expected) == 27
    np.testing.assert_array_equal(np.nonzero(expected == 1)[0], [12, 16, 26])
    ds = data.make_dataset(
        files, sequence_length=4, batch_size=2, shuffle=False, repeat=False
    )
    out = batches(ds)
    assert len(out) == 2  # 27 // 5 = 5 rows -> 2 full batches, 1 dropped
    rows = []
    for x, y, w in out:
        assert (
            x["token_ids"].shape == (2, 4) and x["token_ids"].dtype == "int32"
        )
        assert y.shape == (2, 4) and y.dtype == "int32"
        np.testing.assert_array_equal(x["padding_mask"], np.ones((2, 4)))
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, np.ones((2, 4)))
        # y is x shifted by one: both come from one row of 5 tokens.
        np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])
        rows += [
            np.append(x_row, y_row[-1])
            for x_row, y_row in zip(x["token_ids"], y)
        ]
    # Rows are consecutive, non-overlapping windows of the stream.
    np.testing.assert_array_equal(np.concatenate(rows), expected[:20])
    # The first separator (end of a.txt, stream index 12) is row 2, index 2.
    assert rows[2][2] == data.SEPARATOR_ID


def test_static_shapes_and_repeat(corpus):
    files = data.list_corpus_files(str(corpus))
    ds = data.make_dataset(files, sequence_length=8, batch_size=3)
    x_spec, y_spec, w_spec = ds.element_spec
    assert x_spec["token_ids"].shape == (3, 8)
    assert x_spec["padding_mask"].shape == (3, 8)
    assert y_spec.shape == (3, 8) and w_spec.shape == (3, 8)
    # 27 tokens give 3 rows per pass; repeat keeps going.
    assert len(batches(ds.take(5))) == 5


def test_shuffle_is_deterministic(corpus):
    files = data.list_corpus_files(str(corpus))

    def first_tokens(seed):
        ds = data.make_dataset(files, 4, 2, seed=seed).take(6)
        return np.concatenate([x["token_ids"] for x, _, _ in batches(ds)])

    np.testing.assert_array_equal(first_tokens(0), first_tokens(0))
    assert not np.array_equal(first_tokens(0), first_tokens(1))


def test_sample_weight_zero_on_padding():
    row = np.array([[5, 6, 0, 0]], dtype=np.int32)
    x, y, w = data._to_features(row)
    np.testing.assert_array_equal(x["token_ids"], [[5, 6, 0]])
    np.testing.assert_array_equal(x["padding_mask"], [[1, 1, 0]])
    np.testing.assert_array_equal(y, [[6, 0, 0]])
    np.testing.assert_array_equal(w, [[1.0, 0.0, 0.0]])


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


def test_sequence_too_long(corpus):
    files = data.list_corpus_files(str(corpus))
    with pytest.raises(
        ValueError, match=r"27 tokens.*sequence_length \+ 1 = 28"
    ):
        data.make_dataset(files, sequence_length=27, batch_size=1)
    data.make_dataset(files, sequence_length=26, batch_size=1)  # fits


def test_broken_symlink_is_an_error(corpus):
    os.symlink(corpus / "gone.txt", corpus / "link.txt")
    files = data.list_corpus_files(str(corpus))
    assert str(corpus / "link.txt") in files  # not silently skipped
    with pytest.raises(OSError, match="link.txt"):
        data.make_dataset(files, sequence_length=4, batch_size=1)


def test_file_unreadable_while_streaming(corpus):
    # Passes the size check, then disappears before the dataset reads it.
    victim = write(corpus / "victim.txt", b"0123456789")
    files = [str(corpus / "a.txt"), victim]
    ds = data.make_dataset(
        files, sequence_length=4, batch_size=1, shuffle=False, repeat=False
    )
    os.remove(victim)
    with pytest.raises(Exception, match="victim.txt"):
        batches(ds)
    with pytest.raises(OSError, match="victim.txt"):
        data.read_file_tokens(victim)


def test_default_corpus_files():
    files = data.default_corpus_files()
    assert len(files) > 100
    assert files == sorted(files)
    assert all(f.endswith(".py") for f in files)
    parts = {p for f in files for p in f.split(os.sep)}
    assert not parts & {"site-packages", "test", "tests"}
    assert data.list_corpus_files() == files
