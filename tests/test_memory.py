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
        backbone, mtp_num_layers=mtp_num_layers, mtp_loss_chunk_size=chunk
    )
    model.compile(optimizer="adam")
    x = {
        "token_ids": np.ones((B, T), "int32"),
        "padding_mask": np.ones((B, T), "int32"),
    }
    y, w = np.ones((B, T), "int32"), np.ones((B, T), "float32")
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, non_trainable, x, y, w):
        y_pred, _, losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        main = keras_mtp.SparseCrossEntropy()(y, y_pred, w)
        return main + sum(losses)

    compiled = (
        jax.jit(jax.value_and_grad(loss))
        .lower(trainable, non_trainable, x, y, w)
        .compile()
    )
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def budget():
    base = temp_bytes(0)
    return {
        "base": base,
        "logits": B * T * V * 4,  # one head's float32 logits: 268 MB
        # One more backbone block's activations (75.5 MB here).
        "block": temp_bytes(0, num_layers=L + 1) - base,
    }


def test_chunked_heads_add_only_block_activations(budget):
    # Measured 2026-11-29: +94 MB for D=1, +296 MB for D=4 (one block is
    # 75.5 MB); without chunking +130 MB and +508 MB.
    for depth in (1, 4):
        growth = temp_bytes(depth, chunk=256) - budget["base"]
        assert growth <= depth * 1.3 * budget["block"], (depth, growth)
        assert growth / depth < budget["logits"] / 2  # no (B, T, V) buffer


def test_dense_growth_is_at_most_one_head_and_one_block_per_depth(budget):
    for depth in (1, 4):
        growth = temp_bytes(depth) - budget["base"]
        assert growth <= depth * (budget["logits"] + budget["block"])
        assert growth > temp_bytes(depth, chunk=256) - budget["base"]
