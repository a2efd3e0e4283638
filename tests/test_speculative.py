"""Self-speculative decoding: token for token keras-hub's greedy decoding of
the same backbone, in fewer main forward passes once the heads are trained."""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import BACKBONES
from conftest import VOCAB
from conftest import make_backbone

import keras_mtp
from keras_mtp import backbones

LENGTH = 24  # total length of every generation here: one compiled shape
D = 2


def progressions(rng, rows, length, noise=0.0):
    """Rows `x_{i+1} = x_i + s (mod V)`, `s` in {1, 2, 3} per row: every
    token after the first two is predictable, at any distance ahead."""
    start = rng.integers(0, VOCAB, size=(rows, 1))
    step = rng.integers(1, 4, size=(rows, 1))
    tokens = (start + step * np.arange(length)) % VOCAB
    flip = rng.random(tokens.shape) < noise
    return np.where(flip, rng.integers(0, VOCAB, tokens.shape), tokens)


def prompts(rng, rows, tokens=None, min_length=2, max_length=8):
    """keras-hub's generate inputs: prompts of mixed lengths, padded."""
    if tokens is None:
        tokens = rng.integers(1, VOCAB, size=(rows, LENGTH))
    lengths = rng.integers(min_length, max_length + 1, size=rows)
    mask = np.arange(LENGTH)[None] < lengths[:, None]
    return {
        "token_ids": np.where(mask, tokens, 0).astype("int32"),
        "padding_mask": mask.astype("int32"),
    }


def greedy(backbone, inputs, stop_token_ids=None):
    """keras-hub's own greedy decoding of `backbone`: the reference."""
    task = backbones.causal_lm(backbone)
    task.compile(sampler="greedy")
    return task.generate(inputs, stop_token_ids=stop_token_ids)


def assert_same_outputs(ours, reference):
    mask = np.asarray(reference["padding_mask"], bool)
    np.testing.assert_array_equal(ours["padding_mask"], mask)
    # Past a row's stop token keras-hub leaves whatever it had: compare the
    # tokens the mask keeps.
    np.testing.assert_array_equal(
        np.where(mask, ours["token_ids"], 0),
        np.where(mask, reference["token_ids"], 0),
    )


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
    )
    model = keras_mtp.MTPCausalLM(
        backbone, mtp_num_layers=D, mtp_loss_scaling_factor=1.0
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    rng = np.random.default_rng(0)
    tokens = progressions(rng, 4096, 33, noise=0.05)
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((4096, 32), "int32"),
    }
    model.fit(x, tokens[:, 1:], batch_size=32, epochs=1, verbose=0)
    return model


@pytest.mark.parametrize("stop_token_ids", [None, (3, 17)])
def test_trained_model_decodes_exactly_greedy_in_batches(
    trained, stop_token_ids
):
    rng = np.random.default_rng(1)
    inputs = prompts(rng, 16, progressions(rng, 16, LENGTH))
    ours, stats = trained.generate(
        inputs, stop_token_ids=stop_token_ids, return_stats=True
    )
    assert_same_outputs(ours, greedy(trained.backbone, inputs, stop_token_ids))
    assert stats["tokens_per_forward"] > 1.5, stats
    plain = trained.generate(
        inputs, stop_token_ids=stop_token_ids, speculative=False
    )
    assert_same_outputs(plain, ours)


def test_trained_model_decodes_exactly_greedy_one_prompt_at_a_time(trained):
    rng = np.random.default_rng(2)
    inputs = prompts(rng, 12, progressions(rng, 12, LENGTH, noise=0.1))
    positions = forward_passes = 0
    for row in range(12):
        one = {key: value[row : row + 1] for key, value in inputs.items()}
        ours, stats = trained.generate(one, return_stats=True)
        assert_same_outputs(ours, greedy(trained.backbone, one))
        prompt_length = one["padding_mask"].sum()
        positions += LENGTH - prompt_length
        forward_passes += stats["forward_passes"]
        assert stats["new_tokens"] == LENGTH - prompt_length
        assert len(stats["acceptance"]) == D
    # Most drafts are right on this data: close to D + 1 tokens per forward.
    assert positions / forward_passes > 2.3, (positions, forward_passes)
    assert min(stats["acceptance"]) > 0.8, stats


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_decodes_exactly_greedy(name):
    # Untrained: drafts are mostly rejected, so this checks the verify and
    # rollback path and each family's cache, against keras-hub's.
    model = keras_mtp.MTPCausalLM(make_backbone(name), mtp_num_layers=D)
    rng = np.random.default_rng(3)
    inputs = prompts(rng, 3)
    for stop_token_ids in (None, (5, 9)):
        ours = model.generate(inputs, stop_token_ids=stop_token_ids)
        reference = greedy(model.backbone, inputs, stop_token_ids)
        assert_same_outputs(ours, reference)


def test_prompt_formats_and_max_length(trained):
    rng = np.random.default_rng(4)
    prompt = progressions(rng, 2, 6).astype("int32")
    padded = {
        "token_ids": np.pad(prompt, [(0, 0), (0, LENGTH - 6)]),
        "padding_mask": np.pad(np.ones_like(prompt), [(0, 0), (0, LENGTH - 6)]),
    }
    expected = trained.generate(padded)
    np.testing.assert_array_equal(
        trained.generate(prompt, max_length=LENGTH)["token_ids"],
        expected["token_ids"],
    )
    np.testing.assert_array_equal(
        trained.generate(prompt[0], max_length=LENGTH)["token_ids"],
        expected["token_ids"][:1],
    )
    assert expected["token_ids"].shape == (2, LENGTH)
    # The continuation of a clean progression is the progression.
    step = (prompt[:, 1] - prompt[:, 0]) % VOCAB
    np.testing.assert_array_equal(
        expected["token_ids"],
        (prompt[:, :1] + step[:, None] * np.arange(LENGTH)) % VOCAB,
    )


def test_bad_requests_raise_clear_errors():
    plain = keras_mtp.MTPCausalLM(make_backbone(), mtp_num_layers=0)
    prompt = np.ones((1, 4), "int32")
    with pytest.raises(ValueError, match="mtp_num_layers=0"):
        plain.generate(prompt, max_length=LENGTH, speculative=True)
    model = keras_mtp.MTPCausalLM(make_backbone("gpt2"), mtp_num_layers=D)
    with pytest.raises(ValueError, match="prompt lengths \\[4, 0\\]"):
        model.generate(
            {
                "token_ids": np.ones((2, 8), "int32"),
                "padding_mask": np.array([[1] * 4 + [0] * 4, [0] * 8]),
            }
        )
    with pytest.raises(ValueError, match="`max_length`=3"):
        model.generate(prompt, max_length=3)
    with pytest.raises(ValueError, match="max_sequence_length = 32"):
        model.generate(prompt, max_length=31)  # 31 + D positions > 32
    with pytest.raises(ValueError, match="float32"):
        model.generate(np.ones((1, 4), "float32"), max_length=8)
