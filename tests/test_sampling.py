"""Sampling with keras-hub's samplers, with and without speculation: the
joint distribution of the sampled tokens is the sampler's distribution on
the main model, checked against the one computed in NumPy from the model's
own logits, by a test shown to reject biased variants of the rule."""

import itertools

import keras
import keras_hub
import numpy as np
import pytest
import scipy.stats
from test_speculative import copy_heads

import keras_mtp
from keras_mtp import backbones
from keras_mtp import speculative

VOCAB = 8  # the joint of 3 tokens has 512 cells
LENGTH = 5  # a one-token prompt and 4 sampled tokens
SAMPLES = 4096  # rows of one generate call: one sample each
D = 2
PROMPT = 3  # the prompt's token


def numpy_probabilities(sampler, logits):
    """keras-hub's sampling distribution, as its samplers' source reads:
    temperature softmax, then top-k, then top-p over the sorted tokens."""
    z = logits.astype("float64") / sampler.temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rank = np.argsort(np.argsort(-p, axis=-1), axis=-1)  # 0 = most probable
    k = getattr(sampler, "k", None)
    if k is not None:
        p = np.where(rank < k, p, 0.0)
    if isinstance(sampler, keras_hub.samplers.TopPSampler):
        ordered = -np.sort(-p, axis=-1)
        before = np.cumsum(ordered, -1) - ordered
        kept = (before <= sampler.p).sum(-1, keepdims=True)
        p = np.where(rank < kept, p, 0.0)
    return p / p.sum(-1, keepdims=True)


def exact_joint(model, sampler):
    """P(x_2, x_3, x_4 | x_0 = PROMPT) under `sampler` on the main model,
    from its forward pass over every continuation."""
    rest = np.array(list(itertools.product(range(VOCAB), repeat=LENGTH - 1)))
    tokens = np.concatenate(
        [np.full((len(rest), 1), PROMPT), rest], axis=1
    ).astype("int32")
    logits = model.predict(
        {"token_ids": tokens, "padding_mask": np.ones_like(tokens)},
        batch_size=len(tokens),
        verbose=0,
    )
    probs = numpy_probabilities(sampler, np.asarray(logits)[:, :-1])
    steps = np.take_along_axis(probs, tokens[:, 1:, None], axis=-1)[..., 0]
    joint = steps.prod(axis=1).reshape((VOCAB,) * (LENGTH - 1))
    return joint.sum(axis=0)  # marginal over x_1


def p_value(samples, joint):
    """Chi-square goodness of fit of `samples` `(N, 3)` to `joint`; cells
    expected fewer than 5 times are pooled."""
    counts = np.zeros(joint.size)
    np.add.at(counts, np.ravel_multi_index(samples.T, joint.shape), 1)
    expected = len(samples) * joint.ravel()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    if expected[-1] == 0:
        assert observed[-1] == 0, "a token of probability 0 was sampled"
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    return scipy.stats.chi2.sf(statistic, len(observed) - 1)


def draw(model, sampler, seed, speculative_=True):
    prompt = np.full((SAMPLES, 1), PROMPT, "int32")
    outputs, stats = model.generate(
        prompt,
        max_length=LENGTH,
        sampler=sampler,
        seed=seed,
        speculative=speculative_,
        return_stats=True,
    )
    return outputs["token_ids"][:, 2:], stats


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = backbones.tiny_backbone("llama", vocabulary_size=VOCAB)
    return keras_mtp.MTPCausalLM(backbone, mtp_num_layers=D)


def test_sampler_probabilities_are_keras_hubs():
    logits = np.random.default_rng(0).normal(0, 2, (3, 2, VOCAB))
    samplers = [
        keras_hub.samplers.RandomSampler(temperature=0.7),
        keras_hub.samplers.TopKSampler(k=3, temperature=1.5),
        keras_hub.samplers.TopPSampler(p=0.5),
        keras_hub.samplers.TopPSampler(p=0.8, k=4, temperature=0.5),
    ]
    for sampler in samplers:
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(
                speculative.sampler_probabilities(sampler, logits)
            ),
            numpy_probabilities(sampler, logits),
            atol=1e-6,
        )
    with pytest.raises(ValueError, match="BeamSampler"):
        speculative.sampler_probabilities(
            keras_hub.samplers.BeamSampler(), logits
        )


def test_uniform_draws_and_inverse_cdf_sampling():
    u = keras.ops.convert_to_numpy(speculative.uniform(3, 5, (100_000,)))
    assert 0 < u.min() and u.max() < 1
    counts = np.histogram(u, bins=64, range=(0, 1))[0]
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    other = keras.ops.convert_to_numpy(speculative.uniform(3, 6, (100_000,)))
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.02
    probs = np.array([0.5, 0.0, 0.2, 0.3], "float32")
    tokens = keras.ops.convert_to_numpy(
        speculative.sample(np.tile(probs, (len(u), 1)), u)
    )
    counts = np.bincount(tokens, minlength=4)
    assert counts[1] == 0
    kept = probs > 0
    expected = len(u) * probs[kept].astype("float64")
    assert scipy.stats.chisquare(counts[kept], expected).pvalue > 1e-3


@pytest.mark.slow
def test_speculative_sampling_is_exact_and_the_test_has_power(monkeypatch):
    # Untrained heads: drafts are rejected often, so the residual
    # distribution matters. With SAMPLES rows in one batch, rows advance
    # by the smallest accepted count (almost always 0): a row that accepted
    # more keeps one accepted draft and drops the rest.
    model = make_model()
    sampler = keras_hub.samplers.TopKSampler(k=6, temperature=0.6)
    joint = exact_joint(model, sampler)
    ours, stats = draw(model, sampler, seed=1)
    assert 0.2 < stats["acceptance"][0] < 0.9, stats
    assert p_value(ours, joint) > 1e-3
    # keras-hub's own sampling (no speculation) agrees with the reference.
    plain, _ = draw(model, sampler, seed=1, speculative_=False)
    assert p_value(plain, joint) > 1e-3
    # The same seed gives the same draws, with and without speculation.
    np.testing.assert_array_equal(draw(model, sampler, seed=1)[0], ours)
    again, _ = draw(model, sampler, seed=1, speculative_=False)
    np.testing.assert_array_equal(again, plain)
    if keras.config.backend() != "jax":
        return  # the test's power does not depend on the backend
    # Biased rules are rejected: resampling from p instead of the residual,
    # and accepting with probability p(x) instead of min(1, p(x) / q(x)).
    biased = {
        "residual": lambda p, q: p,
        "accept_drafts": lambda p, q, drafts, uniform: (
            uniform < take(p, drafts)
        ),
    }
    for name, function in biased.items():
        with monkeypatch.context() as patch:
            patch.setattr(speculative, name, function)
            model.__dict__.pop("_decoders")  # compile again
            samples, _ = draw(model, sampler, seed=1)
        assert p_value(samples, joint) < 1e-6, name
    model.__dict__.pop("_decoders")


def take(probs, tokens):
    return keras.ops.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def test_speculative_sampling_accepting_every_draft_is_exact():
    # Copy heads draft from the main model's own distribution: every draft
    # is accepted, so the tokens come from depth 1, depth 2 and the bonus
    # token of each window.
    model = copy_heads(make_model())
    sampler = keras_hub.samplers.RandomSampler(temperature=0.5)
    ours, stats = draw(model, sampler, seed=2)
    assert min(stats["acceptance"]) > 0.99, stats
    assert stats["reached"][1] >= 0.99 * SAMPLES, stats  # depth 2 checked
    assert p_value(ours, exact_joint(model, sampler)) > 1e-3


def test_compile_sets_the_default_sampler():
    model = make_model()
    prompt = np.random.default_rng(3).integers(0, VOCAB, (4, 2))
    prompt = prompt.astype("int32")
    greedy = model.generate(prompt, max_length=LENGTH)["token_ids"]
    # Top-1 sampling is greedy decoding, whatever the seed.
    model.compile(sampler=keras_hub.samplers.TopKSampler(k=1))
    for speculative_ in (True, False):
        np.testing.assert_array_equal(
            model.generate(
                prompt, max_length=LENGTH, seed=5, speculative=speculative_
            )["token_ids"],
            greedy,
        )
    # generate's sampler overrides compile's for one call.
    model.compile(sampler="random")
    np.testing.assert_array_equal(
        model.generate(prompt, max_length=LENGTH, sampler="greedy")[
            "token_ids"
        ],
        greedy,
    )
    with pytest.raises(ValueError, match="ContrastiveSampler"):
        model.generate(
            prompt,
            max_length=LENGTH,
            sampler=keras_hub.samplers.ContrastiveSampler(),
        )
    with pytest.raises(ValueError, match="seed"):
        model.generate(prompt, max_length=LENGTH, seed=1.5)
