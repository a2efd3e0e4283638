"""MTPLayer / MTPBlock against independent NumPy code (docs/objective.md).
The backbone's own transformer block and final norm are black boxes
here (keras-hub's layers); everything MTP adds is recomputed in NumPy."""

import keras
import numpy as np
import pytest
from conftest import LENGTH
from conftest import VOCAB
from conftest import make_backbone
from keras import ops

import keras_mtp
from keras_mtp import backbones


def np_(x):
    return ops.convert_to_numpy(x)


def numpy_targets_and_weights(x, m, s, k):
    """docs/objective.md's rule, written with loops."""
    batch, length = x.shape
    targets = np.zeros_like(x)
    weights = np.zeros(x.shape, "float32")
    for b in range(batch):
        for i in range(length):
            j = i + k + 1
            if j >= length:
                continue
            targets[b, i] = x[b, j]
            ok = m[b, j] == 1 and m[b, i] == 1
            if s is not None:
                ok = ok and s[b, i] != 0 and all(s[b, i : j + 1] == s[b, i])
            weights[b, i] = float(ok)
    return targets, weights


def numpy_segment_mask(s):
    """Packed rows' attention: key `j <= i` in query `i`'s run of equal ids,
    or any key `j <= i` where query `i` or key `j` is padding (id 0)."""
    batch, length = s.shape
    mask = np.zeros((batch, length, length), bool)
    for b in range(batch):
        for i in range(length):
            for j in range(i + 1):
                padding = s[b, i] == 0 or s[b, j] == 0
                mask[b, i, j] = padding or all(s[b, j : i + 1] == s[b, i])
    return mask


def numpy_rms_norm(v, scale, eps):
    return v / np.sqrt(np.mean(v**2, -1, keepdims=True) + eps) * scale


def numpy_mtp_losses(block, hidden, x, m, s, outputs=None):
    """`L_k` per depth; with `mtp_targets="main"`, against softmax of the
    main logits `h^0 @ Head` at `i + k`. `outputs`, a dict, gets each
    depth's top-1 ids and accuracy against the data."""
    emb = block.token_embedding
    table = np_(emb.embeddings)
    head = table.T if emb.tie_weights else np_(emb.reverse_embeddings)
    scale = block.embedding_scale or 1.0
    eps = block.layer_norm_epsilon
    length = x.shape[1]
    h = hidden
    main_logits = hidden @ head  # z^0, (B, T, V)
    losses = []
    for k, layer in enumerate(block.mtp_layers, start=1):
        ahead = np.array(
            [
                [row[i + k] if i + k < length else 0 for i in range(length)]
                for row in x
            ]
        )  # x[i + k], 0 beyond the end
        e = table[ahead] * scale
        u = np.concatenate(
            [
                numpy_rms_norm(e, np_(layer.embedding_norm.scale), eps),
                numpy_rms_norm(h, np_(layer.hidden_norm.scale), eps),
            ],
            axis=-1,
        ) @ np_(layer.projection.kernel)
        attention_mask = None if s is None else numpy_segment_mask(s)
        h = np_(
            backbones.call_decoder(
                layer.transformer_block, u, m, attention_mask=attention_mask
            )
        )
        logits = np_(layer.output_norm(h)) @ head
        z = logits - logits.max(-1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
        targets, weights = numpy_targets_and_weights(x, m, s, k)
        ce = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        if block.mtp_targets == "main":
            teacher = np.zeros_like(main_logits)
            teacher[:, : length - k] = main_logits[:, k:]  # z^0_{i+k}
            p = np.exp(teacher - teacher.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            ce = -(p * log_probs).sum(-1)
        if outputs is not None:
            top = logits.argmax(-1)
            outputs.setdefault("predictions", []).append(top)
            outputs.setdefault("accuracies", []).append(
                ((top == targets) * weights).sum() / max(weights.sum(), 1.0)
            )
        losses.append((ce * weights).sum() / max(weights.sum(), 1.0))
    return np.array(losses)


def make_block(backbone, num_layers, seed=1, **kwargs):
    block = keras_mtp.MTPBlock(
        token_embedding=backbone.token_embedding,
        transformer_block=backbone.transformer_layers[-1],
        output_norm=backbone.layer_norm,
        num_layers=num_layers,
        loss_scaling_factor=0.3,
        embedding_scale=backbones.embedding_scale(backbone),
        layer_norm_epsilon=backbones.layer_norm_epsilon(backbone),
        **kwargs,
    )
    block.build((None, None, backbone.hidden_dim))
    # Distinct norm scales, so swapping the concat order changes the result.
    rng = np.random.default_rng(seed)
    for layer in block.mtp_layers:
        for norm in (layer.embedding_norm, layer.hidden_norm):
            norm.scale.assign(rng.uniform(0.5, 1.5, norm.scale.shape))
    return block


def packed_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(3, LENGTH)).astype("int32")
    s = np.array(
        [
            [1] * 5 + [2] * 6 + [0],
            [1] * LENGTH,
            [3] * 4 + [0] * (LENGTH - 4),
        ]
    )
    m = (s != 0).astype("int32")
    x[m == 0] = 0
    return x, m, s


@pytest.mark.parametrize(
    "name, tie", [("llama", True), ("llama", False), ("gemma", True)]
)
@pytest.mark.parametrize("use_segments", [False, True])
def test_block_losses_match_numpy(name, tie, use_segments):
    backbone = make_backbone(name)
    if not tie:
        config = {**backbone.get_config(), "tie_word_embeddings": False}
        keras.utils.set_random_seed(0)
        backbone = backbone.__class__.from_config(config)
    block = make_block(backbone, num_layers=3)
    x, m, s = packed_inputs()
    s = s if use_segments else None
    hidden = np_(backbone({"token_ids": x, "padding_mask": m}))
    outputs = block(hidden, x, m, segment_ids=s)
    expected = numpy_mtp_losses(block, hidden, x, m, s)
    np.testing.assert_allclose(np_(outputs["losses"]), expected, atol=1e-5)
    # The number of valid positions per depth: the NumPy rule's weights.
    counts = [numpy_targets_and_weights(x, m, s, k)[1].sum() for k in (1, 2, 3)]
    np.testing.assert_array_equal(np_(outputs["tokens"]), counts)
    # The block adds λ · mean_k L_k, and nothing else, with add_loss.
    assert len(block.losses) == 1
    np.testing.assert_allclose(
        np_(block.losses[0]), 0.3 * expected.mean(), atol=1e-5
    )


@pytest.mark.parametrize("chunk", [None, 5])
def test_distilled_block_matches_numpy(chunk):
    # mtp_targets="main": depth k's soft CE against softmax(z^0_{i+k}) on
    # packed rows with padding, dense and chunked; accuracies still count
    # the data's token; the top-1 ids and weights feed the acceptance.
    backbone = make_backbone("llama")
    block = make_block(
        backbone, num_layers=2, mtp_targets="main", loss_chunk_size=chunk
    )
    x, m, s = packed_inputs()
    hidden = np_(backbone({"token_ids": x, "padding_mask": m}))
    outputs = {k: np_(v) for k, v in block(hidden, x, m, s).items()}
    expected = {}
    losses = numpy_mtp_losses(block, hidden, x, m, s, expected)
    np.testing.assert_allclose(outputs["losses"], losses, atol=1e-5)
    np.testing.assert_allclose(
        outputs["accuracies"], expected["accuracies"], atol=1e-6
    )
    np.testing.assert_array_equal(
        outputs["predictions"], expected["predictions"]
    )
    weights = [numpy_targets_and_weights(x, m, s, k)[1] for k in (1, 2)]
    np.testing.assert_array_equal(outputs["weights"], weights)
    assert outputs["predictions"].dtype == np.int32
    config = block.get_config()
    assert config["mtp_targets"] == "main"
    assert keras_mtp.MTPBlock.from_config(config).mtp_targets == "main"


def test_all_padding_batch_gives_zero_mtp_loss():
    backbone = make_backbone("llama")
    block = make_block(backbone, num_layers=2)
    x = np.zeros((2, LENGTH), "int32")
    m = np.zeros((2, LENGTH), "int32")
    hidden = backbone({"token_ids": x, "padding_mask": m})
    outputs = {k: np_(v) for k, v in block(hidden, x, m).items()}
    np.testing.assert_array_equal(outputs["losses"], [0.0, 0.0])
    np.testing.assert_array_equal(outputs["accuracies"], [0.0, 0.0])
    np.testing.assert_array_equal(outputs["tokens"], [0.0, 0.0])
    assert np.isfinite(np_(block.losses[0]))


def test_sequence_too_short_for_depth_raises():
    backbone = make_backbone("llama")
    block = make_block(backbone, num_layers=3)
    x = np.ones((2, 4), "int32")
    hidden = backbone({"token_ids": x, "padding_mask": x})
    with pytest.raises(ValueError, match="at least num_layers \\+ 2 = 5"):
        block(hidden, x, x)


def test_block_bad_arguments():
    backbone = make_backbone("llama")
    kwargs = dict(
        token_embedding=backbone.token_embedding,
        transformer_block=backbone.transformer_layers[-1],
        output_norm=backbone.layer_norm,
    )
    with pytest.raises(ValueError, match="-1"):
        keras_mtp.MTPBlock(num_layers=-1, **kwargs)
    with pytest.raises(ValueError, match="-0.5"):
        keras_mtp.MTPBlock(loss_scaling_factor=-0.5, **kwargs)
    with pytest.raises(ValueError, match="nan"):
        keras_mtp.MTPBlock(loss_scaling_factor=float("nan"), **kwargs)
    with pytest.raises(ValueError, match="mtp_targets='logits'"):
        keras_mtp.MTPBlock(mtp_targets="logits", **kwargs)
    with pytest.raises(ValueError, match="Dense"):
        keras_mtp.MTPBlock(
            token_embedding=keras.layers.Dense(4),
            transformer_block=backbone.transformer_layers[-1],
            output_norm=backbone.layer_norm,
        )


def test_layer_returns_hidden_and_normed():
    backbone = make_backbone("gpt2")
    layer = keras_mtp.MTPLayer(
        hidden_dim=16,
        transformer_block=backbone.transformer_layers[-1],
        output_norm=backbone.layer_norm,
    )
    h = np.random.default_rng(0).normal(size=(2, LENGTH, 16))
    e = np.random.default_rng(1).normal(size=(2, LENGTH, 16))
    hidden, normed = layer(h, e, np.ones((2, LENGTH), "int32"))
    assert hidden.shape == normed.shape == (2, LENGTH, 16)
    np.testing.assert_allclose(
        np_(layer.output_norm(hidden)), np_(normed), atol=1e-6
    )
    # Pinned: two RMSNorm scales (2·16), W_k (32·16), a GPT-2 block
    # (4·16·16 + 4·16 attention, 2·16·32 + 32 + 16 MLP, 4·16 norms) and a
    # LayerNorm (2·16).
    assert layer.count_params() == 32 + 512 + (1088 + 1072 + 64) + 32
