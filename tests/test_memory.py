"""Compiled (XLA) temp memory of a training step: deterministic, so it can
be pinned. GPT-2-style d=256, L=4, T=256, batch 8, V=32768 (the benchmark's
large-vocabulary config); nothing is executed, only compiled."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_mtp

pytestmark = pytest.mark.slow
V, T, B, L = 32768, 256, 8, 4


def temp_bytes(mtp_num_layers, chunk=None, num_layers=L):
    if keras.config.backend() != "jax":
        pytest.skip("XLA memory analysis needs the JAX backend")
    import jax

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=V,
        num_layers=num_layers,
        num_heads=4,
        hidden_dim=256,
        intermediate_dim=1024,
        max_sequence_length=T,
        dropout=0.0,
    )
    model = keras_mtp.MTPCausalLM(
        backbone, mtp_num_layers=mtp_num_layers, loss_chunk_size=chunk
    )
    model.compile(optimizer="adam")
    model.optimizer.build(model.trainable_variables)
    x = {
        "token_ids": np.ones((B, T), "int32"),
        "padding_mask": np.ones((B, T), "int32"),
    }
    y, w = np.ones((B, T), "int32"), np.ones((B, T), "float32")
    # The step `fit` jits: forward, backward, Adam and metrics.
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    step = jax.jit(model.train_step, donate_argnums=0)
    compiled = step.lower(state, (x, y, w)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def budget():
    base = temp_bytes(0)
    return {
        "base": base,
        "chunked_base": temp_bytes(0, chunk=256),
        "logits": B * T * V * 4,  # one head's float32 logits: 268 MB
        "kernel": V * 256 * 4,  # the head's (d, V) gradient: 33.5 MB
        # One more backbone block's activations (76.6 MB here).
        "block": temp_bytes(0, num_layers=L + 1) - base,
    }


def test_chunked_depth_4_needs_less_than_dense_depth_0(budget):
    # Measured 2026-11-29: 835 MB (chunks of 128; 852 MB with 256) against
    # 855 MB. Chunking every head saves 403 MB at D=0; each depth then adds
    # about one block's activations (77 MB) plus its inputs (23 MB).
    assert temp_bytes(4, chunk=128) <= budget["base"]


def test_chunked_mtp_heads_add_only_block_activations(budget):
    # Measured 2026-11-29: +134 MB for D=1, +399 MB for D=4: a block and its
    # inputs per depth, and the MTP pass's own head gradient.
    for depth in (1, 4):
        growth = temp_bytes(depth, chunk=256) - budget["chunked_base"]
        limit = depth * 1.35 * budget["block"] + budget["kernel"]
        assert growth <= limit, (depth, growth)
        assert growth / depth < budget["logits"] / 2  # no (B, T, V) buffer


def test_dense_growth_is_at_most_one_head_and_one_block_per_depth(budget):
    # Measured 2026-11-30 (MiB): dense +125.5 for D=1, +489.0 for D=4;
    # chunked +127.4 and +413.0. One dense depth costs what a chunked one
    # does (XLA reuses the main head's logits buffer); the chunks' saving
    # grows with the depths.
    for depth in (1, 4):
        growth = temp_bytes(depth) - budget["base"]
        assert growth <= depth * (budget["logits"] + budget["block"])
    chunked = temp_bytes(4, chunk=256) - budget["chunked_base"]
    assert growth > chunked


def test_tied_head_gradient_has_no_batch_by_vocabulary_by_width_tensor():
    """TensorFlow's gradient of `einsum("...d,vd->...v")` builds a
    `(..., V, d)` tensor (31 GiB for 1024 tokens at V=32000, d=256: an
    out-of-memory error); the head contracts a rank-2 view instead."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("a TensorFlow gradient graph; JAX's is pinned above")
    import tensorflow as tf

    from keras_mtp import backbones

    vocabulary, width = 37, 8
    embedding = keras_hub.layers.ReversibleEmbedding(vocabulary, width)
    embedding.build((None,))
    hidden = tf.ones((2, 3, 5, width))  # (D, B, T, d), as chunks are

    @tf.function
    def gradients(hidden):
        kernel = backbones.head_kernel(embedding)
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            logits = backbones.apply_head(embedding, hidden, kernel)
            loss = tf.reduce_sum(tf.nn.log_softmax(logits))
        return tape.gradient(loss, [hidden, embedding.embeddings])

    graph = gradients.get_concrete_function(hidden).graph
    shapes = [
        tuple(t.shape) for op in graph.get_operations() for t in op.outputs
    ]
    assert (2, 3, 5, vocabulary) in shapes  # the logits: the graph is read
    too_big = [
        s for s in shapes if len(s) > 2 and vocabulary in s and width in s
    ]
    assert not too_big, too_big
