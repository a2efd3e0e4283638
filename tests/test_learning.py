"""Alignment by learning: each depth learns exactly what its inputs allow.

Every odd position is a fixed function of the token before it and every even
position is random. Depth k at position i sees tokens up to i + k and predicts
x[i + k + 1]: the odd targets are learnable, the even ones are not, so its loss
goes to (share of even targets) · log(V). A target leaking into the input would
drive it to 0; an embedding off by one position would leave it at log(V).
"""

import math

import keras
import keras_hub
import numpy as np
import pytest

import keras_mtp

V, T, D = 16, 16, 2
pytestmark = pytest.mark.slow


def batches(rng, rows, structured):
    tokens = rng.integers(0, V, size=(rows, T + 1))
    if structured:
        permutation = np.random.default_rng(123).permutation(V)
        tokens[:, 1::2] = permutation[tokens[:, 0:-1:2]]
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((rows, T), "int32"),
    }
    return x, tokens[:, 1:], np.ones((rows, T), "float32")


def trained_depth_losses(structured):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=V,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
    )
    model = keras_mtp.MTPCausalLM(
        backbone, mtp_num_layers=D, mtp_loss_scaling_factor=1.0
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    rng = np.random.default_rng(0)
    x, y, w = batches(rng, 8192, structured)
    model.fit(x, y, sample_weight=w, batch_size=32, epochs=1, verbose=0)
    x, y, w = batches(rng, 256, structured)  # held out
    logs = model.evaluate(x, y, sample_weight=w, return_dict=True, verbose=0)
    return [logs[f"mtp_loss_{k}"] for k in range(1, D + 1)], logs


def test_each_depth_learns_exactly_the_learnable_half():
    losses, logs = trained_depth_losses(structured=True)
    for k, loss in enumerate(losses, start=1):
        targets = range(k + 1, T)  # target positions j = i + k + 1
        random_share = sum(j % 2 == 0 for j in targets) / len(targets)
        expected = random_share * math.log(V)
        assert abs(loss - expected) < 0.15, (k, loss, expected, logs)


def test_random_tokens_teach_no_depth_anything():
    losses, logs = trained_depth_losses(structured=False)
    for k, loss in enumerate(losses, start=1):
        assert loss > math.log(V) - 0.1, (k, loss, logs)
