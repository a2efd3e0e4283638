"""Self-speculative decoding: token for token keras-hub's greedy decoding of
the same backbone, in fewer main forward passes once the heads are trained."""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import BACKBONES
from conftest import VOCAB
from conftest import fast_compilation
from conftest import make_backbone
from keras import ops

import keras_mtp
from keras_mtp import backbones
from keras_mtp import speculative

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
    outputs = speculative.keras_hub_generate(task, inputs, stop_token_ids)
    return {k: ops.convert_to_numpy(v) for k, v in outputs.items()}


def assert_greedy_of_forward_pass(model, inputs, outputs):
    """Every generated token is the argmax of the model's own forward pass
    (keras-hub's `predict`) over the tokens before it: greedy decoding,
    defined without any cache."""
    tokens = outputs["token_ids"]
    logits = model.predict(
        {"token_ids": tokens, "padding_mask": np.ones_like(tokens)},
        batch_size=len(tokens),
        verbose=0,
    )
    prompt = np.asarray(inputs["padding_mask"], bool)
    generated = ~prompt[:, 1:] & outputs["padding_mask"][:, 1:]
    np.testing.assert_array_equal(
        np.where(generated, tokens[:, 1:], -1),
        np.where(generated, logits[:, :-1].argmax(-1), -1),
    )


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


# Stop tokens for one family per cache form (stacked key/value, per-layer
# key/value with keras-hub's update mask, hybrid with recurrent states): the
# stopping logic is the same loop for all.
STOPS = {"llama": (5, 9), "gemma3": (5, 9), "qwen3_5": (5, 9)}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_decodes_exactly_greedy(name):
    # Untrained: drafts are mostly rejected, so this checks the verify and
    # rollback path and each family's cache, against keras-hub's.
    family = backbones.family(name)
    reason = family.skip_backends.get(keras.config.backend())
    if reason:
        pytest.skip(reason)
    with fast_compilation(family.recurrent):
        decode_and_compare(name, family)


def decode_and_compare(name, family):
    model = keras_mtp.MTPCausalLM(make_backbone(name), mtp_num_layers=D)
    rng = np.random.default_rng(3)
    inputs = prompts(rng, 3)
    stop_token_ids = STOPS.get(name)
    ours, stats = model.generate(
        inputs, stop_token_ids=stop_token_ids, return_stats=True
    )
    if family.keras_hub_generate is None:
        reference = greedy(model.backbone, inputs, stop_token_ids)
        assert_same_outputs(ours, reference)
    else:
        # keras-hub's generate is not this model's greedy decoding (see the
        # registry): the reference is the forward pass itself, and the
        # plain (non-speculative) decoding is keras_mtp's own loop.
        assert_greedy_of_forward_pass(model, inputs, ours)
        plain = model.generate(
            inputs, stop_token_ids=stop_token_ids, speculative=False
        )
        assert_same_outputs(plain, ours)
    assert stats["forward_passes"] >= 1


def test_recurrent_decoding_through_accepted_drafts():
    # An untrained model's drafts are rejected, so the end-to-end tests above
    # keep offset 0. Here one row's prompt is long and the other row stops
    # at once: the windows over the long prompt accept all D drafts (prompt
    # tokens are forced), so the Gated DeltaNet states of whole windows are
    # kept, then generation goes on from them.
    with fast_compilation():
        model = keras_mtp.MTPCausalLM(
            make_backbone("qwen3_5"), mtp_num_layers=D
        )
        lengths = np.array([2, 18])
        mask = np.arange(LENGTH)[None] < lengths[:, None]
        tokens = np.random.default_rng(6).integers(1, VOCAB, (2, LENGTH))
        inputs = {
            "token_ids": np.where(mask, tokens, 0).astype("int32"),
            "padding_mask": mask.astype("int32"),
        }
        first = model.generate(inputs)["token_ids"][0, 2]
        ours, stats = model.generate(
            inputs, stop_token_ids=(int(first),), return_stats=True
        )
        assert ours["padding_mask"][0].sum() == 3  # row 0 stopped at once
        assert stats["tokens_per_forward"] > 1.5, stats
        assert_greedy_of_forward_pass(model, inputs, ours)


def test_recurrent_state_is_the_one_after_the_accepted_tokens():
    # Qwen3.5: verification runs the Gated DeltaNet layers token by token
    # and keeps each state; accepting `a` drafts keeps the state after
    # offset `a`, which must be the state of feeding those tokens one at a
    # time (keras-hub's own decoding step).
    with fast_compilation():
        check_recurrent_state_selection()


def check_recurrent_state_selection():
    backbone = make_backbone("qwen3_5")
    task = backbones.causal_lm(backbone)
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, VOCAB, size=(2, 12)).astype("int32")
    first, width = 4, D + 1
    _, cache = speculative._prefill(task, tokens, None, first)
    window = tokens[:, first : first + width]
    logits, _, steps = speculative._verify(task, window, cache, first, None)
    single = cache
    for a in range(width):
        one_logits, _, single = speculative._verify(
            task, window[:, a : a + 1], single, first + a, None
        )
        single = speculative._select(backbone, single, 0)
        np.testing.assert_allclose(
            ops.convert_to_numpy(logits[:, a]),
            ops.convert_to_numpy(one_logits[:, 0]),
            atol=1e-5,
        )
        selected = speculative._select(backbone, steps, a)
        for state, expected in zip(selected[1:], single[1:]):
            np.testing.assert_allclose(
                ops.convert_to_numpy(state),
                ops.convert_to_numpy(expected),
                atol=1e-6,
            )
    # The prefill's state is the state after the tokens before `first`.
    _, from_zero = speculative._prefill(task, tokens, None, 0)
    for t in range(first):
        _, _, from_zero = speculative._verify(
            task, tokens[:, t : t + 1], from_zero, t, None
        )
        from_zero = speculative._select(backbone, from_zero, 0)
    for state, expected in zip(cache[1:], from_zero[1:]):
        np.testing.assert_allclose(
            ops.convert_to_numpy(state),
            ops.convert_to_numpy(expected),
            atol=1e-6,
        )


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
        model.generate(prompt, max_length=33)  # plain decoding cannot either
    with pytest.raises(ValueError, match="float32"):
        model.generate(np.ones((1, 4), "float32"), max_length=8)


def copy_heads(model):
    """Makes every block of `model` (trunk and MTP) the identity (zero
    attention and feed-forward outputs) and depth k's projection pick the
    normalized token embedding: the main model predicts from the last
    token alone, and depth k at position i predicts from `x_{i+k}` the same
    token (up to rounding), i.e. exactly the main model's next token. Every
    draft built from the right tokens is then accepted."""
    for variable in model.weights:
        if variable.path.endswith(
            ("attention_output/kernel", "feedforward_output_dense/kernel")
        ):
            variable.assign(np.zeros(variable.shape))
        if variable.path.endswith("projection/kernel"):  # (2d, d)
            width = variable.shape[1]
            variable.assign(np.eye(2 * width, width))
    return model


def test_drafts_read_the_earlier_drafts_from_any_prompt_length():
    # Copy heads accept every draft built from the right tokens. Two
    # defects of the prefill drafted from the wrong ones: depth >= 2 read
    # the padding after the prompt instead of depth 1's draft, and a
    # one-token prompt read one position too far.
    model = copy_heads(
        keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=D)
    )
    rng = np.random.default_rng(7)
    for lengths in ([1], [3, 5]):
        mask = np.arange(LENGTH)[None] < np.array(lengths)[:, None]
        tokens = rng.integers(1, VOCAB, (len(lengths), LENGTH))
        inputs = {
            "token_ids": np.where(mask, tokens, 0).astype("int32"),
            "padding_mask": mask.astype("int32"),
        }
        ours, stats = model.generate(inputs, return_stats=True)
        assert_same_outputs(ours, greedy(model.backbone, inputs))
        assert stats["acceptance"] == [1.0] * D, stats
        assert min(stats["reached"]) > 0, stats
        # The prefill gives the first token, then D + 1 per forward pass.
        left = LENGTH - min(lengths) - 1
        assert stats["forward_passes"] == 1 + -(-left // (D + 1)), stats


@pytest.mark.slow
def test_stats_stop_at_each_rows_stop_token():
    model = copy_heads(
        keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=D)
    )
    rng = np.random.default_rng(8)
    prompt = rng.integers(1, VOCAB, (1, 4)).astype("int32")
    tokens = model.generate(prompt, max_length=LENGTH)["token_ids"][0]
    generated = tokens[4:]
    # A stop token first generated third: one prefill token, then one
    # forward pass accepting both drafts (the stop token the second).
    third = next(
        i for i in range(2, len(generated)) if generated[i] not in generated[:i]
    )
    stop = int(generated[third])
    ours, stats = model.generate(
        prompt, max_length=LENGTH, stop_token_ids=(stop,), return_stats=True
    )
    assert ours["padding_mask"][0].sum() == 4 + third + 1
    assert stats["new_tokens"] == third + 1
    # Positions past the stop token are not counted, nor drafts past it.
    forwards = 1 + -(-third // (D + 1))
    assert stats["forward_passes"] == forwards, stats
    assert stats["tokens_per_forward"] == (third + 1) / forwards, stats
    drafts_checked = third  # every generated token after the first
    assert sum(stats["reached"]) == drafts_checked, stats
    assert stats["acceptance"] == [1.0] * D, stats
    # In a batch, each row counts its own positions and the forward passes
    # while it generated: here row 0 stops at once, row 1 never.
    candidates = rng.integers(1, VOCAB, (4, 4)).astype("int32")
    plain = model.generate(candidates, max_length=LENGTH)["token_ids"][:, 4:]
    i, j = next(
        (i, j)
        for i in range(4)
        for j in range(4)
        if plain[i, 0] not in plain[j]
    )
    batch, stop = candidates[[i, j]], int(plain[i, 0])
    both, stats = model.generate(
        batch, max_length=LENGTH, stop_token_ids=(stop,), return_stats=True
    )
    np.testing.assert_array_equal(both["padding_mask"].sum(axis=1), [5, LENGTH])
    assert stats["tokens_per_forward"] == (1 + LENGTH - 4) / (
        1 + stats["forward_passes"]
    ), stats


def test_learned_positions_decode_up_to_max_sequence_length():
    # GPT-2 (learned positions, max_sequence_length 32): windows near the
    # end start earlier instead of reaching past position 31.
    model = keras_mtp.MTPCausalLM(make_backbone("gpt2"), mtp_num_layers=D)
    limit = model.backbone.max_sequence_length
    rng = np.random.default_rng(9)
    lengths = np.array([3, 6])
    mask = np.arange(limit)[None] < lengths[:, None]
    tokens = rng.integers(1, VOCAB, (2, limit))
    inputs = {
        "token_ids": np.where(mask, tokens, 0).astype("int32"),
        "padding_mask": mask.astype("int32"),
    }
    ours, stats = model.generate(inputs, return_stats=True)
    assert_same_outputs(ours, greedy(model.backbone, inputs))
    assert ours["padding_mask"].all()
