"""Drafting over a frequency-ranked sub-vocabulary (FR-Spec): the depths
score only K ids, the main model verifies over all V, so greedy output is
unchanged token for token and sampled output in distribution."""

import collections
import os

import keras
import keras_hub
import numpy as np
import pytest
from conftest import VOCAB
from conftest import make_backbone
from test_sampling import SAMPLES
from test_sampling import draw
from test_sampling import exact_joint
from test_sampling import make_model
from test_sampling import p_value
from test_speculative import assert_same_outputs
from test_speculative import copy_heads
from test_speculative import greedy
from test_speculative import prompts

import keras_mtp
from keras_mtp import backbones
from keras_mtp import speculative

D = 2


def test_frequent_tokens_ranks_by_count_then_id():
    rng = np.random.default_rng(0)
    batches = [rng.zipf(1.5, size=(4, 16)) % 50 for _ in range(3)]
    counts = collections.Counter(np.concatenate(batches, None).tolist())
    expected = sorted(range(50), key=lambda i: (-counts[i], i))
    np.testing.assert_array_equal(
        speculative.frequent_tokens(batches, 20, 50), expected[:20]
    )
    # One array, and ties (and unseen ids) in id order.
    ids = speculative.frequent_tokens(np.array([[5, 3, 3], [5, 9, 1]]), 6, 10)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [3, 5, 1, 9, 0, 2])


@pytest.mark.parametrize(
    "args, match",
    [
        (([1, 2], 0, 10), "size=0"),
        (([1, 2], 11, 10), "size=11"),
        (([1, 2], True, 10), "size=True"),
        (([1, 2], 2.0, 10), "size=2.0"),
        (([1, 12], 2, 10), r"\[12\]"),
        (([np.array([-1, 2])], 2, 10), r"\[-1\]"),
        (([np.array([0.5])], 1, 10), "float"),
        (([1], 1, 0), "vocabulary_size"),
    ],
)
def test_frequent_tokens_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        speculative.frequent_tokens(*args)


def test_set_draft_vocabulary_checks_its_ids():
    model = keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=1)
    assert model.draft_vocabulary is None
    model.set_draft_vocabulary([3, 1, 2])
    np.testing.assert_array_equal(model.draft_vocabulary, [3, 1, 2])
    bad = {
        "repeated": [1, 2, 1],
        r"\[32\]": [1, 32],
        r"\[-2\]": [-2],
        "shape": [[1, 2]],
        r"shape \(0,\)": [],
        "integers": [1.5],
    }
    for match, ids in bad.items():
        with pytest.raises(ValueError, match=match):
            model.set_draft_vocabulary(ids)
    np.testing.assert_array_equal(model.draft_vocabulary, [3, 1, 2])
    model.set_draft_vocabulary(None)
    assert model.draft_vocabulary is None


def test_decoding_logits_are_the_reversed_embeddings():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, 3, 8)).astype("float32")
    ids = np.array([5, 0, 7], "int32")
    for tie_weights, cap in [(True, None), (False, None), (True, 2.0)]:
        embedding = keras_hub.layers.ReversibleEmbedding(
            10, 8, tie_weights=tie_weights, logit_soft_cap=cap
        )
        embedding.build((None,))
        table = keras.ops.convert_to_numpy(
            embedding.embeddings
            if tie_weights
            else keras.ops.transpose(embedding.reverse_embeddings)
        )  # (V, d)
        expected = hidden @ table.T
        if cap is not None:
            expected = np.tanh(expected / cap) * cap
        for token_ids, columns in [(None, slice(None)), (ids, ids)]:
            kernel = backbones.decoding_kernel(embedding, token_ids)
            logits = backbones.decoding_logits(embedding, hidden, kernel)
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(logits),
                expected[..., columns],
                rtol=1e-5,
                atol=1e-5,
            )


def test_greedy_output_is_unchanged_by_any_draft_vocabulary():
    # Copy heads draft the main model's own next token: with all ids every
    # draft is accepted; without the ids greedy decoding generates, none.
    backbone = make_backbone("llama")
    model = copy_heads(keras_mtp.MTPCausalLM(backbone, mtp_num_layers=D))
    inputs = prompts(np.random.default_rng(2), rows=3)
    reference = greedy(backbone, inputs)
    generated = np.asarray(reference["token_ids"])[
        ~np.asarray(inputs["padding_mask"], bool)
    ]
    outside = np.setdiff1d(np.arange(VOCAB), generated)
    vocabularies = {
        "all, shuffled": np.random.default_rng(3).permutation(VOCAB),
        "without the generated ids": outside,
        "one generated id": generated[:1],
    }
    for name, ids in vocabularies.items():
        model.set_draft_vocabulary(ids)
        ours, stats = model.generate(inputs, return_stats=True)
        assert_same_outputs(ours, reference)
        if name == "all, shuffled":
            assert min(stats["acceptance"]) > 0.99, stats
        if name == "without the generated ids":
            assert stats["accepted"] == [0] * D, stats
            assert stats["reached"][0] > 0, stats


def test_speculative_residual_with_zeros_outside_the_draft_vocabulary():
    # One step of the rule, in NumPy from its own functions: draw x ~ q,
    # keep it with probability min(1, p(x)/q(x)), else draw from the
    # residual. The output's distribution is p, though q is 0 outside the
    # draft vocabulary (where p is not).
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(VOCAB), size=5).astype("float32")
    inside = np.zeros(VOCAB, bool)
    inside[rng.permutation(VOCAB)[:10]] = True
    q = rng.dirichlet(np.ones(10), size=5).astype("float32")
    full = keras.ops.convert_to_numpy(
        speculative.spread(q, np.where(inside, np.cumsum(inside) - 1, 10))
    )
    np.testing.assert_allclose(full[:, inside], q)
    assert (full[:, ~inside] == 0).all()
    kept = full * np.minimum(1, p / np.maximum(full, 1e-30))
    residual = keras.ops.convert_to_numpy(speculative.residual(p, full))
    output = kept + (1 - kept.sum(-1, keepdims=True)) * residual
    np.testing.assert_allclose(output, p, atol=1e-6)


@pytest.mark.slow
def test_speculative_sampling_from_a_draft_vocabulary_is_exact():
    # Copy heads on the 8-token model: with ids 6 and 7 left out of the
    # drafts, their probability comes from the residual alone.
    model = copy_heads(make_model())
    sampler = keras_hub.samplers.RandomSampler(temperature=0.7)
    joint = exact_joint(model, sampler)
    model.set_draft_vocabulary([5, 0, 3, 1, 4, 2])
    ours, stats = draw(model, sampler, seed=3)
    assert 0.2 < stats["acceptance"][0] < 0.99, stats
    assert p_value(ours, joint) > 1e-3
    # All ids, in another order: every draft of the copy heads accepted.
    model.set_draft_vocabulary([7, 5, 0, 3, 1, 6, 4, 2])
    ours, stats = draw(model, sampler, seed=4)
    assert min(stats["acceptance"]) > 0.99, stats
    assert stats["reached"][1] >= 0.99 * SAMPLES, stats
    assert p_value(ours, joint) > 1e-3


def test_draft_vocabulary_is_saved_in_presets_and_keras_files(tmp_path):
    model = keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=1)
    model.set_draft_vocabulary([4, 9, 2])
    inputs = prompts(np.random.default_rng(5), rows=2)
    expected = model.generate(inputs)["token_ids"]
    model.save_to_preset(str(tmp_path / "preset"))
    loaded = keras_mtp.MTPCausalLM.from_preset(
        str(tmp_path / "preset"), preprocessor=None
    )
    np.testing.assert_array_equal(loaded.draft_vocabulary, [4, 9, 2])
    np.testing.assert_array_equal(
        loaded.generate(inputs)["token_ids"], expected
    )
    # A setting given to from_preset, None included, is the constructor's.
    assert (
        keras_mtp.MTPCausalLM.from_preset(
            str(tmp_path / "preset"), preprocessor=None, draft_vocabulary=None
        ).draft_vocabulary
        is None
    )
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded.draft_vocabulary, [4, 9, 2])
    np.testing.assert_array_equal(
        loaded.generate(inputs)["token_ids"], expected
    )


@pytest.mark.slow
def test_bench_draft_measures_every_mode(monkeypatch):
    if keras.config.backend() != "jax":
        pytest.skip("the benchmark runs on JAX; the JAX test leg runs it")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    import bench_draft

    model = copy_heads(
        keras_mtp.MTPCausalLM(make_backbone("llama"), mtp_num_layers=1)
    )
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, VOCAB, (1, 4)).astype("int32")]
    vocabularies = bench_draft.draft_vocabularies(
        model, [rng.integers(0, VOCAB, 64)], sizes=(8,)
    )
    result = bench_draft.speculative_step_ratio(
        model, prompts, (8, 16), vocabularies, rounds=1
    )
    assert list(result) == ["plain", "full", "K=8"]
    for mode in ("full", "K=8"):  # timings of a tiny model: noise
        assert np.isfinite(result[mode]["step_ratio"]), result
    assert result["full"]["acceptance_1"] > 0.99, result
    cost = bench_draft.acceptance_cost(model, prompts, 16, vocabularies)
    assert cost["full"]["acceptance_1"] > 0.99, cost
    assert model.draft_vocabulary is None  # restored
