"""A pretrained keras-hub preset, as a user drives it: from_preset, fit on
strings, generate text, save_to_preset, from_preset again. The presets are
tiny models with tiny tokenizers that the tests save to local directories
(nothing downloads)."""

import io
import os
import re

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

import keras_mtp
from keras_mtp import presets

TEXTS = [
    "the cat sat on the mat",
    "a dog ate the bone",
    "the bird sang a song",
    "my cat and the dog",
    "a mat on the cat",
    "the song of a bird",
    "dogs and cats sat",
    "the bone of the dog",
]
LENGTH = 12


def gpt2_preset(directory):
    backbone, tokenizer = gpt2_parts()
    return save_preset(directory, backbone, tokenizer, "GPT2")


def gpt2_parts():
    """A tiny GPT-2 backbone and a BPE tokenizer of TEXTS' characters."""
    chars = sorted(set("".join(TEXTS).replace(" ", "")))
    vocab = {"Ġ": 0}  # keras-hub pads GPT-2 with id 0: not the end token
    for c in chars:
        vocab[c] = len(vocab)
        vocab["Ġ" + c] = len(vocab)
    vocab["th"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocab, merges=["t h"] + [f"Ġ {c}" for c in chars]
    )
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocab) + 4,  # a few more rows than ids
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
        dropout=0.0,
    )
    return backbone, tokenizer


def llama_preset(directory):
    """A SentencePiece family: a tiny model trained here."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 4),
        model_writer=proto,
        vocab_size=40,
        model_type="bpe",
        pad_id=0,
        unk_id=3,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    tokenizer = keras_hub.models.LlamaTokenizer(proto=proto.getvalue())
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=40,
        num_layers=1,
        num_query_heads=4,  # shardable on a 2 x 4 mesh
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )
    return save_preset(directory, backbone, tokenizer, "Llama")


def save_preset(directory, backbone, tokenizer, family):
    """A plain keras-hub preset, as `CausalLM.save_to_preset` writes it."""
    preprocessor = getattr(keras_hub.models, f"{family}CausalLMPreprocessor")(
        tokenizer=tokenizer, sequence_length=LENGTH
    )
    task = getattr(keras_hub.models, f"{family}CausalLM")(
        backbone=backbone, preprocessor=preprocessor
    )
    path = os.path.join(directory, family.lower())
    task.save_to_preset(path)
    return path


PRESETS = {"gpt2": gpt2_preset, "llama": llama_preset}


def values(variables):
    return [ops.convert_to_numpy(v) for v in variables]


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_preset_to_strings_to_preset(family, tmp_path, capsys):
    preset = PRESETS[family](str(tmp_path))
    model = keras_mtp.MTPCausalLM.from_preset(preset, mtp_num_layers=2)
    assert "2 MTP depth(s) freshly initialized" in capsys.readouterr().out
    assert isinstance(model.preprocessor, keras_hub.models.CausalLMPreprocessor)
    hub = keras_hub.models.CausalLM.from_preset(preset)
    for ours, theirs in zip(model.backbone.weights, hub.backbone.weights):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(ours), ops.convert_to_numpy(theirs)
        )

    # Strings in: the preprocessor makes x, y and the weights. (Seeding
    # clears TensorFlow's caches, SentencePiece's resource included: the
    # strings must still go through.)
    keras.utils.set_random_seed(1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(
        TEXTS, batch_size=4, epochs=3, validation_split=0.25, verbose=0
    ).history
    assert history["loss"][-1] < history["loss"][0]
    assert np.isfinite(history["val_mtp_loss_2"]).all()
    logs = model.evaluate(TEXTS, batch_size=4, return_dict=True, verbose=0)
    assert logs["mtp_loss_1"] > 0

    # Strings out: the main model's greedy text, with speculation.
    text, stats = model.generate(
        "the cat", max_length=LENGTH, return_stats=True
    )
    assert isinstance(text, str) and text.startswith("the cat")
    assert stats["forward_passes"] >= 1
    assert model.generate(["the cat"], max_length=LENGTH) == [text]
    hub.backbone.set_weights(model.backbone.get_weights())
    hub.compile(sampler="greedy")
    assert text == hub.generate("the cat", max_length=LENGTH)
    plain = model.generate("the cat", max_length=LENGTH, speculative=False)
    assert plain == text
    stripped = model.generate("the cat", max_length=LENGTH, strip_prompt=True)
    assert stripped == hub.generate(
        "the cat", max_length=LENGTH, strip_prompt=True
    )

    # Round trip: same predictions, same MTP losses.
    saved = os.path.join(str(tmp_path), "mtp_preset")
    model.mtp_loss_scaling_factor = 0.25
    model.save_to_preset(saved)
    capsys.readouterr()
    loaded = keras_mtp.MTPCausalLM.from_preset(saved)
    assert "MTP depths 1-2 loaded" in capsys.readouterr().out
    assert loaded.mtp_num_layers == 2
    assert loaded.mtp_loss_scaling_factor == pytest.approx(0.25)
    np.testing.assert_allclose(
        loaded.predict(TEXTS, verbose=0),
        model.predict(TEXTS, verbose=0),
        atol=1e-6,
    )
    # Compiled on loading, as keras-hub's tasks are: it evaluates at once.
    again = loaded.evaluate(TEXTS, batch_size=4, return_dict=True, verbose=0)
    for key in ("main_loss", "mtp_loss_1", "mtp_loss_2", "mtp_accuracy_2"):
        np.testing.assert_allclose(again[key], logs[key], rtol=1e-5)
    # Plain keras-hub still loads the trunk.
    trunk = keras_hub.models.Backbone.from_preset(saved)
    for a, b in zip(values(trunk.weights), values(model.backbone.weights)):
        np.testing.assert_array_equal(a, b)
    assert isinstance(
        keras_hub.models.CausalLM.from_preset(saved), keras_hub.models.CausalLM
    )

    # Other depth counts: a prefix of the chain, or more fresh depths.
    one = keras_mtp.MTPCausalLM.from_preset(saved, mtp_num_layers=1)
    assert "depths 2-2 unused" in capsys.readouterr().out
    for a, b in zip(
        values(one.mtp_block.mtp_layers[0].weights),
        values(model.mtp_block.mtp_layers[0].weights),
    ):
        np.testing.assert_array_equal(a, b)
    three = keras_mtp.MTPCausalLM.from_preset(
        saved, mtp_num_layers=3, compile=False
    )
    assert not three.compiled
    assert "depths 3-3 freshly initialized" in capsys.readouterr().out
    for a, b in zip(
        values(three.mtp_block.mtp_layers[1].weights),
        values(model.mtp_block.mtp_layers[1].weights),
    ):
        np.testing.assert_array_equal(a, b)

    # The .keras format keeps the preprocessor too.
    path = os.path.join(str(tmp_path), "m.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.preprocessor.get_config() == model.preprocessor.get_config()
    np.testing.assert_allclose(
        reloaded.predict(TEXTS, verbose=0),
        model.predict(TEXTS, verbose=0),
        atol=1e-6,
    )


def test_generate_of_no_prompts_returns_no_texts(tmp_path):
    # A list of N prompts gives N texts, N = 0 included (keras-hub 0.32's
    # `CausalLM.generate([])` raises an IndexError on JAX and torch).
    preset = gpt2_preset(str(tmp_path))
    model = keras_mtp.MTPCausalLM.from_preset(preset, mtp_num_layers=1)
    assert model.generate([]) == []
    texts, stats = model.generate([], return_stats=True, strip_prompt=True)
    assert texts == []
    assert stats["forward_passes"] == 0 and stats["new_tokens"] == 0
    assert stats["reached"] == [0] and stats["accepted"] == [0]
    # Without a preprocessor, an empty list is no prompt at all.
    bare = keras_mtp.MTPCausalLM(model.backbone, mtp_num_layers=1)
    with pytest.raises(ValueError, match=r"empty list.*Received: \[\]"):
        bare.generate([])


def test_explicit_none_is_not_the_presets_setting(tmp_path, capsys):
    # A setting given to from_preset, None included, means what it means to
    # the constructor; only a setting not given comes from mtp.json.
    preset = gpt2_preset(str(tmp_path))
    saved = str(tmp_path / "chunked")
    keras_mtp.MTPCausalLM.from_preset(
        preset,
        mtp_num_layers=1,
        mtp_loss_scaling_factor=0.3,
        mtp_detach_trunk=True,
        loss_chunk_size=4,
        mtp_targets="main",
    ).save_to_preset(saved)
    restored = keras_mtp.MTPCausalLM.from_preset(saved)
    assert restored.loss_chunk_size == 4 and restored.mtp_detach_trunk
    assert restored.mtp_targets == "main" and restored.mtp_num_layers == 1
    backbone = restored.backbone
    for key in presets._SETTINGS:
        try:
            model = keras_mtp.MTPCausalLM(backbone, **{key: None})
        except ValueError as error:  # the constructor refuses None
            with pytest.raises(ValueError, match=re.escape(str(error))):
                keras_mtp.MTPCausalLM.from_preset(saved, **{key: None})
            continue
        loaded = keras_mtp.MTPCausalLM.from_preset(saved, **{key: None})
        assert getattr(loaded, key) == getattr(model, key), key
    capsys.readouterr()


def test_saving_leaves_the_directory_describing_the_model_saved(
    tmp_path, capsys
):
    preset = gpt2_preset(str(tmp_path))
    saved = tmp_path / "saved"
    two = keras_mtp.MTPCausalLM.from_preset(preset, mtp_num_layers=2)
    two.save_to_preset(str(saved))
    stale = (saved / "mtp.weights.h5").read_bytes()
    (saved / "notes.txt").write_text("the user's own file")
    zero = keras_mtp.MTPCausalLM.from_preset(preset, mtp_num_layers=0)
    zero.save_to_preset(str(saved))
    assert not (saved / "mtp.weights.h5").exists()
    assert (saved / "notes.txt").read_text() == "the user's own file"
    capsys.readouterr()
    keras_mtp.MTPCausalLM.from_preset(str(saved), mtp_num_layers=2)
    out = capsys.readouterr().out
    assert "2 MTP depth(s) freshly initialized" in out, out
    # A directory an older save left so: mtp.json says no depths, so the
    # weights file beside it belongs to another model.
    (saved / "mtp.weights.h5").write_bytes(stale)
    keras_mtp.MTPCausalLM.from_preset(str(saved), mtp_num_layers=2)
    out = capsys.readouterr().out
    assert "2 MTP depth(s) freshly initialized" in out, out


def test_frozen_trunk_trains_only_the_heads(tmp_path):
    tf = pytest.importorskip("tensorflow")
    preset = gpt2_preset(str(tmp_path))
    model = keras_mtp.MTPCausalLM.from_preset(preset, mtp_num_layers=1)
    model.backbone.trainable = False  # the heads-only fine-tune
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    trunk = values(model.backbone.weights)
    layer = model.mtp_block.mtp_layers[0]  # the block also holds the
    heads = values(layer.weights)  # shared (frozen) embedding: not these
    history = model.fit(  # a tf.data.Dataset of strings, and validation
        tf.data.Dataset.from_tensor_slices(TEXTS).batch(4),
        validation_data=TEXTS[:2],
        epochs=2,
        verbose=0,
    ).history
    assert np.isfinite(history["val_mtp_loss"]).all()
    for before, after in zip(trunk, values(model.backbone.weights)):
        np.testing.assert_array_equal(before, after)
    for before, after, v in zip(heads, values(layer.weights), layer.weights):
        assert np.abs(after - before).max() > 0, v.path


def test_preprocessor_must_fit_the_backbone(tmp_path):
    preset = gpt2_preset(str(tmp_path))
    preprocessor = keras_hub.models.CausalLMPreprocessor.from_preset(preset)
    small = keras_hub.models.GPT2Backbone(
        vocabulary_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )
    size = preprocessor.tokenizer.vocabulary_size()
    with pytest.raises(
        ValueError, match=f"tokenizer of vocabulary_size={size}"
    ):
        keras_mtp.MTPCausalLM(small, preprocessor)
    preprocessor.sequence_length = 3
    backbone = keras_hub.models.Backbone.from_preset(preset)
    with pytest.raises(ValueError, match="at least num_layers \\+ 2 = 4"):
        keras_mtp.MTPCausalLM(backbone, preprocessor, mtp_num_layers=2)
    preprocessor.sequence_length = LENGTH
    model = keras_mtp.MTPCausalLM(backbone, preprocessor, mtp_num_layers=1)
    with pytest.raises(ValueError, match="text is its own target"):
        model.fit(TEXTS, np.zeros((8, LENGTH)), verbose=0)
    with pytest.raises(ValueError, match="no `preprocessor`"):
        keras_mtp.MTPCausalLM(backbone, mtp_num_layers=1).generate("a")


def test_from_preset_under_a_distribution_creates_sharded_weights(tmp_path):
    if keras.config.backend() != "jax":
        pytest.skip("keras.distribution shards weights on JAX")
    preset = llama_preset(str(tmp_path))
    devices = keras.distribution.list_devices()[:8]
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    reference = keras_mtp.MTPCausalLM.from_preset(preset, mtp_num_layers=1)
    layout_map = keras_mtp.distribution.get_layout_map(
        mesh, keras_hub.models.LlamaBackbone, mtp_num_layers=1
    )
    distribution = keras.distribution.ModelParallel(layout_map=layout_map)
    with distribution.scope():
        model = keras_mtp.MTPCausalLM.from_preset(preset, mtp_num_layers=1)
    sharded = [
        v
        for v in model.weights
        if len(v.value.sharding.device_set) == 8
        and v.value.addressable_shards[0].data.size < v.value.size
    ]
    paths = {v.path for v in sharded}
    assert any(p.startswith("mtp_block/mtp_layer_1/projection") for p in paths)
    assert any(p.startswith("transformer_layer_0/") for p in paths), paths
    # The loaded trunk equals the unsharded one.
    for a, b in zip(
        values(model.backbone.weights), values(reference.backbone.weights)
    ):
        np.testing.assert_array_equal(a, b)
