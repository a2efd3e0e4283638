"""Packed rows: documents that share a row neither attend to each other nor
share positions, in the trunk and in every MTP depth, for every family that
supports it; a training step on packed rows is the step on the same
documents unpacked."""

import keras
import numpy as np
import pytest
from conftest import LENGTH
from conftest import VOCAB
from conftest import clone_backbone
from conftest import make_backbone
from keras import ops

import keras_mtp
from keras_mtp import backbones
from keras_mtp import ops as mtp_ops

DEPTHS = 2
PACKABLE = tuple(f.name for f in backbones.FAMILIES if f.no_packing is None)
UNPACKABLE = tuple(f.name for f in backbones.FAMILIES if f.no_packing)
# What the other backends run: one decoder of each way to take the mask (a
# keyword, Gemma's method) and of each kind of position (RoPE, learned,
# ALiBi, Gemma4's position ids).
REPRESENTATIVE = ("llama", "gpt2", "gemma", "bloom", "gemma4")


def np_(x):
    return ops.convert_to_numpy(x)


def families(names, others=REPRESENTATIVE):
    """`names` on JAX; on the other backends only those in `others` (CI
    runs every test file on each backend, and time is short)."""
    if keras.config.backend() == "jax":
        return list(names)
    return [name for name in names if name in others]


def make_model(name, num_layers=DEPTHS, seed=0):
    return keras_mtp.MTPCausalLM(
        make_backbone(name, seed), mtp_num_layers=num_layers
    )


# === The mask and positions, against NumPy ===================================


def numpy_mask_and_positions(segments):
    """Loops: key j is visible to query i iff j <= i and no id change lies
    in j..i (one run of equal ids), or query i or key j is padding (id
    0)."""
    batch, length = segments.shape
    mask = np.zeros((batch, length, length), bool)
    positions = np.zeros((batch, length), int)
    for b in range(batch):
        for i in range(length):
            start = i
            while start > 0 and segments[b, start - 1] == segments[b, i]:
                start -= 1
            positions[b, i] = i - start
            for j in range(i + 1):
                padding = segments[b, i] == 0 or segments[b, j] == 0
                mask[b, i, j] = j >= start or padding
    return mask, positions


def test_segment_mask_and_positions_match_numpy():
    segments = np.array(
        [
            [1, 1, 1, 2, 2, 2, 2, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
            [3, 3, 1, 1, 3, 0, 0, 0, 0],  # equal ids apart: two documents
            [0, 0, 0, 1, 1, 2, 2, 2, 0],  # an id-0 prefix
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    mask, positions = numpy_mask_and_positions(segments)
    got = backbones.segment_attention_mask(segments)
    assert tuple(got.shape) == mask.shape
    assert np_(got).dtype == bool
    np.testing.assert_array_equal(np_(got), mask)
    np.testing.assert_array_equal(
        np_(backbones.segment_positions(segments)), positions
    )


# === A packed document is the document alone =================================

A = np.array([5, 9, 3, 17, 2])
B = np.array([7, 1, 30, 12, 4, 22])
C = np.array([11, 8, 19])


def row(*docs, length=LENGTH):
    """`(token_ids, padding_mask, segment_ids)` of one row packing `docs`
    (segment ids 1, 2, ...), padded to `length`."""
    ids = np.concatenate(docs)
    segments = np.concatenate(
        [np.full(len(d), k + 1) for k, d in enumerate(docs)]
    )
    pad = length - len(ids)
    return (
        np.pad(ids, (0, pad)),
        np.pad(np.ones_like(ids), (0, pad)),
        np.pad(segments, (0, pad)),
    )


def batch(*rows_, segments=True):
    keys = ("token_ids", "padding_mask", "segment_ids")
    x = {
        k: np.stack([r[i] for r in rows_]).astype("int32")
        for i, k in enumerate(keys)
    }
    if not segments:
        del x["segment_ids"]
    return x


def outputs(model, x):
    """Main logits `(B, T, V)`, and the per-position cross-entropy `(D, B,
    T)` of every MTP depth against its target with its weights `w^k`;
    through the packed path where `x` has segment ids."""
    segments = x.get("segment_ids")
    token_ids = ops.convert_to_tensor(x["token_ids"])
    padding_mask = ops.convert_to_tensor(x["padding_mask"])
    if segments is not None:
        segments = ops.convert_to_tensor(segments)
    hidden = backbones.call_backbone(
        model.backbone,
        backbones.backbone_inputs(model.backbone, token_ids, padding_mask),
        segments,
    )
    block = model.mtp_block
    normed = block._depth_chain(
        hidden, token_ids, padding_mask, False, segments
    )
    kernel = backbones.head_kernel(block.token_embedding)
    losses, weights = [], []
    for k, h in enumerate(normed, start=1):
        targets, w = mtp_ops.mtp_targets_and_weights(
            token_ids, padding_mask, k, segments
        )
        logits = block._head(h, kernel)
        losses.append(np_(mtp_ops.sparse_cross_entropy(logits, targets)))
        weights.append(np_(w))
    logits = np_(block._head(hidden, kernel))
    return logits, np.stack(losses), np.stack(weights)


@pytest.mark.parametrize("name", families(PACKABLE))
def test_packed_document_gives_what_it_gives_alone(name):
    """B after A in a row gives, at every position of B, the main logits
    and MTP-depth losses of B alone in its own (unpacked, padded) row; A's
    are unchanged by what follows it, wherever it starts."""
    model = make_model(name)
    packed = batch(row(A, B), row(B, A), row(C, A, B[:3]))
    alone = batch(row(A), row(B), row(C), row(B[:3]), segments=False)
    logits, losses, weights = outputs(model, packed)
    logits_alone, losses_alone, weights_alone = outputs(model, alone)
    # (packed row, offset) -> alone row, for every document of `packed`.
    places = {
        (0, 0): 0,
        (0, 5): 1,
        (1, 0): 1,
        (1, 6): 0,
        (2, 0): 2,
        (2, 3): 0,
        (2, 8): 3,
    }
    lengths = [len(A), len(B), len(C), 3]
    for (r, offset), a in places.items():
        n = lengths[a]
        np.testing.assert_allclose(
            logits[r, offset : offset + n],
            logits_alone[a, :n],
            atol=1e-5,
            err_msg=f"{name}: main logits of row {r} at {offset}",
        )
        w = weights[:, r, offset : offset + n]
        np.testing.assert_array_equal(w, weights_alone[:, a, :n])
        assert w.sum() > 0 or n <= DEPTHS + 1
        np.testing.assert_allclose(
            losses[:, r, offset : offset + n] * w,
            losses_alone[:, a, :n] * w,
            atol=1e-5,
            err_msg=f"{name}: MTP losses of row {r} at {offset}",
        )


@pytest.mark.parametrize("name", families(["llama", "bloom"], ["llama"]))
def test_relative_positions_need_no_restart(name):
    """RoPE (llama) and ALiBi (bloom) are relative: B after a
    document of 1000 tokens gives what B gives alone, to 1e-5 in float32, so
    only learned absolute positions are restarted."""
    length = 1024
    rng = np.random.default_rng(0)
    long = rng.integers(1, VOCAB, size=length - 24)
    doc = rng.integers(1, VOCAB, size=24)
    model = make_model(name, num_layers=0)
    packed = batch(row(long, doc, length=length))
    alone = batch(row(doc, length=24), segments=False)
    np.testing.assert_allclose(
        np_(model(packed))[0, -24:], np_(model(alone))[0], atol=1e-5
    )


def test_rows_of_one_document_are_the_unpacked_rows():
    """Segment ids 1 on the document and 0 on its padding change nothing,
    padding positions included; without segment ids, the model's output is
    the backbone's own call, bit for bit."""
    model = make_model("llama")
    x = batch(row(A), row(B), row(np.concatenate([B, A])))
    plain = {k: v for k, v in x.items() if k != "segment_ids"}
    np.testing.assert_allclose(np_(model(x)), np_(model(plain)), atol=1e-6)
    hidden = model.backbone(plain)
    expected = model.backbone.token_embedding(hidden, reverse=True)
    np.testing.assert_array_equal(np_(model(plain)), np_(expected))


# === Families that cannot keep documents apart ===============================


@pytest.mark.parametrize("name", UNPACKABLE)
def test_unsupported_family_names_itself(name):
    model = make_model(name, num_layers=1)
    x = batch(row(A, B), row(C))
    y = np.roll(x["token_ids"], -1, axis=1)
    message = f"not supported for the '{name}' family"
    with pytest.raises(ValueError, match=message):
        model(x)
    with pytest.raises(ValueError, match=message):  # before any tracing
        model.fit(x, y, verbose=0)


# === A training step on packed rows is the step on the documents ============

DOCS = [A, B, C, np.array([3, 14, 15, 9])]


def xy(rows_, segments=True):
    """`(x, y, sample_weight)`: next-token targets within each document,
    weight 0 where the next token is another document's or padding."""
    x = batch(*rows_, segments=segments)
    ids, mask = x["token_ids"], x["padding_mask"]
    seg = np.stack([r[2] for r in rows_])
    y = np.roll(ids, -1, axis=1)
    y[:, -1] = 0
    nxt = np.roll(seg, -1, axis=1)
    nxt[:, -1] = 0
    w = ((seg == nxt) & (mask == 1)).astype("float32")
    return x, y.astype("int32"), w


@pytest.mark.parametrize("name", families(["gpt2", "gemma"], ["gpt2"]))
def test_training_step_on_packed_rows_is_the_step_unpacked(name):
    """Two rows of 12 packing four documents, and the four documents in
    rows of 6, padded (the same 24 token slots, so the main loss's `B·T`
    and every weight match): the same loss and the same weights after a
    step, to 1e-5."""
    model = make_model(name)
    twin = keras_mtp.MTPCausalLM(
        clone_backbone(model.backbone), mtp_num_layers=DEPTHS
    )
    twin.mtp_block.set_weights(model.mtp_block.get_weights())
    packed = xy([row(A, B), row(C, DOCS[3])])
    unpacked = xy([row(d, length=LENGTH // 2) for d in DOCS], segments=False)
    results = []
    for m, (x, y, w) in ((model, packed), (twin, unpacked)):
        m.compile(optimizer=keras.optimizers.SGD(0.5))
        logs = m.train_on_batch(x, y, sample_weight=w, return_dict=True)
        results.append(logs)
    for key in ("loss", "main_loss", "mtp_loss_1", "mtp_loss_2"):
        np.testing.assert_allclose(
            results[0][key], results[1][key], rtol=1e-5, err_msg=key
        )
    for v, u in zip(model.trainable_variables, twin.trainable_variables):
        np.testing.assert_allclose(
            np_(v), np_(u), atol=1e-5, err_msg=f"{name}: {v.path}"
        )


def test_family_packing_fields_agree():
    """Only recurrent trunks refuse packing; exactly the families with a
    learned position table name the layer that restarts it; each packable
    family has one way to take the mask (the per-family test above checks
    that the layers take it)."""
    for f in backbones.FAMILIES:
        assert bool(f.no_packing) == f.recurrent, f.name
        assert f.learned_positions == (f.position_layer is not None), f.name
        ways = (f.attention_mask_kwarg, f.attention_mask_method)
        assert sum(way is not None for way in ways) == 1, f.name
