"""Exact tokenization for Hugging Face checkpoints, as a user meets it:
`MTPCausalLM.from_preset(directory)` of a checkpoint gives the ids of the
checkpoint's own `tokenizer.json` (read by the `tokenizers` library, the
reference), keeps them through `save_to_preset` / `from_preset` and `.keras`
files, and trains and generates on strings with them. The checkpoints are
tiny ones built here (`tests/hf_checkpoints.py`), one per byte-level BPE
family whose keras-hub tokenizer differs; the slow test is SmolLM2-135M."""

import os

import keras
import keras_hub
import numpy as np
import pytest

import keras_mtp
from keras_mtp import hf_tokenizer

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

import hf_checkpoints  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

# keras-hub's converters of these families read tokenizer.json's vocabulary
# and merges into a BytePairTokenizer and ignore the rest.
FAMILIES = ["smollm", "llama3", "qwen2", "qwen3", "gpt2"]
SAMPLE = hf_checkpoints.stdlib_texts(20)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`checkpoint(family)`: the family's tiny checkpoint, built once."""
    built = {}

    def checkpoint(family):
        if family not in built:
            directory = tmp_path_factory.mktemp(family)
            built[family] = hf_checkpoints.build(str(directory), family)
        return built[family]

    return checkpoint


def reference(directory):
    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))


def differing(preprocessor, tokenizer, texts):
    """How many of `texts` get other ids from `preprocessor` than from the
    `tokenizers.Tokenizer` `tokenizer` (start token included)."""
    return sum(
        hf_tokenizer.preprocessor_ids(preprocessor, text)
        != tokenizer.encode(text).ids
        for text in texts
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_from_preset_tokenizes_as_the_checkpoint(family, checkpoints, capsys):
    directory = checkpoints(family)
    tokenizer = reference(directory)
    plain = keras_hub.models.CausalLMPreprocessor.from_preset(directory)
    # keras-hub's own conversion: the flaw this fixes.
    assert differing(plain, tokenizer, SAMPLE) > 0
    model = keras_mtp.MTPCausalLM.from_preset(directory, mtp_num_layers=1)
    output = capsys.readouterr().out
    lines = [line for line in output.splitlines() if "tokenizer.json" in line]
    assert len(lines) == 1 and "HFTokenizer" in lines[0], output
    assert isinstance(model.preprocessor.tokenizer, hf_tokenizer.HFTokenizer)
    assert differing(model.preprocessor, tokenizer, SAMPLE) == 0
    # Training pads and ends as keras-hub's preprocessor does.
    assert model.preprocessor.tokenizer.end_token_id == (
        plain.tokenizer.end_token_id
    )
    assert model.preprocessor.tokenizer.pad_token_id == (
        plain.tokenizer.pad_token_id
    )


def test_start_token_is_the_checkpoints(checkpoints):
    for family, start in (("smollm", None), ("llama3", "<|im_start|>")):
        directory = checkpoints(family)
        model = keras_mtp.MTPCausalLM.from_preset(directory, mtp_num_layers=1)
        tokenizer = model.preprocessor.tokenizer
        assert getattr(tokenizer, "start_token", None) == start
        assert model.preprocessor.add_start_token == (start is not None)
        ids = hf_tokenizer.preprocessor_ids(model.preprocessor, "x = 1")
        assert ids == reference(directory).encode("x = 1").ids


def test_detokenize_round_trips(checkpoints):
    directory = checkpoints("smollm")
    model = keras_mtp.MTPCausalLM.from_preset(directory, mtp_num_layers=1)
    tokenizer = model.preprocessor.tokenizer
    for text in SAMPLE[:5] + [hf_tokenizer.PROBE]:
        assert tokenizer.detokenize(tokenizer(text)) == text
    batch = tokenizer(SAMPLE[:3])
    assert tokenizer.detokenize(batch) == SAMPLE[:3]


def test_tf_data_gives_the_eager_ids(checkpoints):
    import tensorflow as tf

    directory = checkpoints("smollm")
    preprocessor = keras_mtp.MTPCausalLM.from_preset(
        directory, mtp_num_layers=1
    ).preprocessor
    texts = SAMPLE[:4]
    eager = preprocessor(texts)
    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(4)
    (graph,) = list(dataset.map(preprocessor).as_numpy_iterator())
    for a, b in zip(keras.tree.flatten(eager), keras.tree.flatten(graph)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), b)
    detokenize = tf.function(preprocessor.tokenizer.detokenize)
    strings = detokenize(tf.ragged.constant([[65, 66], [67]]))
    assert [s.decode() for s in strings.numpy()] == (
        preprocessor.tokenizer.detokenize([[65, 66], [67]])
    )


def test_save_and_load_keep_the_exact_tokenizer(checkpoints, tmp_path):
    directory = checkpoints("smollm")
    tokenizer = reference(directory)
    model = keras_mtp.MTPCausalLM.from_preset(directory, mtp_num_layers=1)
    model.save_to_preset(str(tmp_path / "preset"))
    assert os.path.isfile(tmp_path / "preset/assets/tokenizer/tokenizer.json")
    loaded = keras_mtp.MTPCausalLM.from_preset(str(tmp_path / "preset"))
    model.save(str(tmp_path / "model.keras"))
    reloaded = keras.saving.load_model(str(tmp_path / "model.keras"))
    for twin in (loaded, reloaded):
        assert isinstance(twin.preprocessor.tokenizer, hf_tokenizer.HFTokenizer)
        assert not twin.preprocessor.add_start_token
        assert differing(twin.preprocessor, tokenizer, SAMPLE[:5]) == 0


def test_fit_and_generate_on_strings(checkpoints):
    directory = checkpoints("llama3")  # with a start token
    model = keras_mtp.MTPCausalLM.from_preset(directory, mtp_num_layers=1)
    model.preprocessor.sequence_length = 32
    history = model.fit(SAMPLE[:4], batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    prompt = "def f(x):\n    return"
    text = model.generate(prompt, max_length=24)
    assert isinstance(text, str) and text.startswith(prompt)
    assert "<|im_start|>" not in text
    ids = model.generate(
        {"token_ids": np.array([[1, 5, 6, 0]]), "padding_mask": [[1, 1, 1, 0]]},
        stop_token_ids=None,
    )
    assert np.asarray(ids["token_ids"]).shape == (1, 4)


@pytest.mark.slow
def test_smollm2_tokenizes_as_its_checkpoint(smollm2_dir):
    """0 differing ids on 200 stdlib files; and what the tokenizer costs the
    model, in nats per character."""
    tokenizer = reference(smollm2_dir)
    texts = hf_checkpoints.stdlib_texts(200, chars=4000)
    plain = keras_hub.models.CausalLMPreprocessor.from_preset(smollm2_dir)
    model = keras_mtp.MTPCausalLM.from_preset(smollm2_dir, mtp_num_layers=0)
    assert isinstance(model.preprocessor.tokenizer, hf_tokenizer.HFTokenizer)
    assert model.preprocessor.tokenizer.start_token_id is None
    assert differing(model.preprocessor, tokenizer, texts) == 0
    print(
        f"SmolLM2: keras-hub's tokenizer differs on "
        f"{differing(plain, tokenizer, texts)} of {len(texts)} files"
    )
    # The same weights read both tokenizers' ids of the same text.
    sample = hf_checkpoints.stdlib_texts(4, skip=100, chars=1200)
    costs = {}
    for name, preprocessor in (("keras-hub", plain), ("exact", None)):
        preprocessor = preprocessor or model.preprocessor
        preprocessor.sequence_length = 512
        x, y, weight = preprocessor(sample)
        logits = model.predict(x, batch_size=4, verbose=0)
        logits = logits.astype("float64")
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        y = keras.ops.convert_to_numpy(y)
        nll = -np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
        weight = keras.ops.convert_to_numpy(weight)
        costs[name] = (nll * weight).sum() / sum(map(len, sample))
    print(
        "SmolLM2 nats per character of stdlib code: "
        f"keras-hub's tokenizer {costs['keras-hub']:.3f}, "
        f"exact {costs['exact']:.3f}"
    )
    assert costs["exact"] < costs["keras-hub"]


def test_an_exact_keras_hub_tokenizer_is_kept(
    checkpoints, monkeypatch, capsys, tmp_path
):
    """Where keras-hub's ids are the checkpoint's on the probe, its
    preprocessor is returned as it is, silently."""
    directory = checkpoints("smollm")
    plain = keras_hub.models.CausalLMPreprocessor.from_preset(directory)
    monkeypatch.setattr(
        hf_tokenizer,
        "preprocessor_ids",
        lambda preprocessor, text: reference(directory).encode(text).ids,
    )
    assert hf_tokenizer.exact_preprocessor(plain, directory) is plain
    assert capsys.readouterr().out == ""
    # Not a Hugging Face checkpoint (no config.json here): not checked.
    assert hf_tokenizer.exact_preprocessor(plain, str(tmp_path)) is plain
