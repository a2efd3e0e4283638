import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_mtp import backbones
from keras_mtp import ops as mtp_ops


def np_(x):
    return ops.convert_to_numpy(x)


def test_roll_and_mask_maxtext_meaning():
    x = np.arange(1, 9).reshape(1, 8)
    np.testing.assert_array_equal(
        np_(mtp_ops.roll_and_mask(x)), [[2, 3, 4, 5, 6, 7, 8, 0]]
    )
    np.testing.assert_array_equal(
        np_(mtp_ops.roll_and_mask(x, -3)), [[4, 5, 6, 7, 8, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        np_(mtp_ops.roll_and_mask(x, 2)), [[0, 0, 1, 2, 3, 4, 5, 6]]
    )
    np.testing.assert_array_equal(np_(mtp_ops.roll_and_mask(x, 0)), x)
    np.testing.assert_array_equal(np_(mtp_ops.roll_and_mask(x, -8)), 0 * x)


def test_roll_and_mask_rolls_axis_1_of_3d():
    x = np.arange(12, dtype="float32").reshape(1, 4, 3)
    expected = np.concatenate([x[:, 1:], np.zeros((1, 1, 3))], axis=1)
    np.testing.assert_array_equal(np_(mtp_ops.roll_and_mask(x, -1)), expected)


def test_roll_and_mask_bad_input():
    with pytest.raises(ValueError, match="shift=1.5"):
        mtp_ops.roll_and_mask(np.zeros((1, 4)), 1.5)
    with pytest.raises(ValueError, match="rank >= 2"):
        mtp_ops.roll_and_mask(np.zeros((4,)), -1)


def test_targets_and_weights_plain():
    x = np.array([[10, 11, 12, 13, 14, 15]])
    mask = np.ones_like(x)
    targets, weights = mtp_ops.mtp_targets_and_weights(x, mask, 1)
    np.testing.assert_array_equal(np_(targets), [[12, 13, 14, 15, 0, 0]])
    np.testing.assert_array_equal(np_(weights), [[1, 1, 1, 1, 0, 0]])
    targets, weights = mtp_ops.mtp_targets_and_weights(x, mask, 3)
    np.testing.assert_array_equal(np_(targets), [[14, 15, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np_(weights), [[1, 1, 0, 0, 0, 0]])


def test_targets_and_weights_padding():
    x = np.array([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 4]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])  # left pad too
    _, weights = mtp_ops.mtp_targets_and_weights(x, mask, 1)
    np.testing.assert_array_equal(
        np_(weights), [[1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]]
    )


def test_targets_and_weights_packed_segments():
    x = np.arange(1, 9).reshape(1, 8)
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    mask = (segments != 0).astype("int32")
    _, weights = mtp_ops.mtp_targets_and_weights(x, mask, 1, segments)
    np.testing.assert_array_equal(np_(weights), [[1, 0, 0, 1, 1, 0, 0, 0]])
    assert np_(weights).dtype == np.float32  # 0/1, never segment ids
    _, weights = mtp_ops.mtp_targets_and_weights(x, mask, 2, segments)
    np.testing.assert_array_equal(np_(weights), [[0, 0, 0, 1, 0, 0, 0, 0]])


def test_targets_and_weights_segment_returning_to_same_id():
    # A segment id that reappears later is a different document.
    x = np.arange(1, 7).reshape(1, 6)
    segments = np.array([[1, 1, 2, 1, 1, 1]])
    _, weights = mtp_ops.mtp_targets_and_weights(
        x, np.ones_like(x), 1, segments
    )
    np.testing.assert_array_equal(np_(weights), [[0, 0, 0, 1, 0, 0]])


def test_row_shorter_than_depth_plus_one_has_no_weight():
    # Row 0 has 3 real tokens: depth 2 needs i + 3 < 3, impossible.
    x = np.array([[4, 5, 6, 0, 0, 0], [4, 5, 6, 7, 8, 9]])
    mask = (x != 0).astype("int32")
    _, weights = mtp_ops.mtp_targets_and_weights(x, mask, 2)
    np.testing.assert_array_equal(
        np_(weights), [[0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    )


def test_targets_bad_depth():
    with pytest.raises(ValueError, match="depth=0"):
        mtp_ops.mtp_targets_and_weights(np.ones((1, 4)), np.ones((1, 4)), 0)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype("float32") * 4
    targets = rng.integers(0, 7, size=(3, 5))
    weights = rng.integers(0, 2, size=(3, 5)).astype("float32")
    ce = -np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)
    ce = ce[..., 0]
    np.testing.assert_allclose(
        np_(mtp_ops.sparse_cross_entropy(logits, targets)), ce, atol=1e-5
    )
    expected = (ce * weights).sum() / weights.sum()
    np.testing.assert_allclose(
        np_(mtp_ops.masked_cross_entropy(logits, targets, weights)),
        expected,
        atol=1e-5,
    )
    hits = (logits.argmax(-1) == targets).astype("float32")
    np.testing.assert_allclose(
        np_(mtp_ops.masked_accuracy(logits, targets, weights)),
        (hits * weights).sum() / weights.sum(),
        atol=1e-6,
    )


def test_cross_entropy_bfloat16_logits_computed_in_float32():
    logits = np.array([[[30.0, 0.0, -30.0]]])
    ce = mtp_ops.sparse_cross_entropy(ops.cast(logits, "bfloat16"), [[2]])
    assert keras.backend.standardize_dtype(ce.dtype) == "float32"
    np.testing.assert_allclose(np_(ce), [[60.0]], rtol=1e-2)


def test_empty_mask_gives_zero_not_nan():
    logits = np.zeros((2, 3, 5), "float32")
    zero = np.zeros((2, 3), "float32")
    loss = np_(mtp_ops.masked_cross_entropy(logits, zero.astype(int), zero))
    assert loss == 0.0
    assert np_(mtp_ops.masked_accuracy(logits, zero.astype(int), zero)) == 0.0


@pytest.mark.parametrize("chunk_size", [5, 8, 24, 100])
def test_chunked_cross_entropy_equals_dense(chunk_size):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 8, 6)).astype("float32")
    kernel = rng.normal(size=(6, 11)).astype("float32")
    targets = rng.integers(0, 11, size=(3, 8))
    weights = rng.integers(0, 2, size=(3, 8)).astype("float32")

    def dense(h, k):
        logits = ops.matmul(h, k)
        return (
            mtp_ops.masked_cross_entropy(logits, targets, weights),
            mtp_ops.masked_accuracy(logits, targets, weights),
        )

    def chunked(h, k):  # one group
        losses, accuracies = mtp_ops.chunked_cross_entropy(
            h[None], k, targets[None], weights[None], chunk_size
        )
        return losses[0], accuracies[0]

    for a, b in zip(dense(hidden, kernel), chunked(hidden, kernel)):
        np.testing.assert_allclose(np_(a), np_(b), atol=1e-6)
    for index in (0, 1):  # gradients w.r.t. the hidden states and the head
        grads = [
            value_and_grad(lambda h, k: fn(h, k)[0], hidden, kernel, index)
            for fn in (dense, chunked)
        ]
        np.testing.assert_allclose(grads[0][0], grads[1][0], atol=1e-6)
        np.testing.assert_allclose(grads[0][1], grads[1][1], atol=1e-5)


def value_and_grad(fn, hidden, kernel, index):
    """(value, gradient w.r.t. argument `index`) on the active backend."""
    if keras.config.backend() == "jax":
        import jax

        value, grad = jax.value_and_grad(fn, argnums=index)(hidden, kernel)
        return np.asarray(value), np.asarray(grad)
    if keras.config.backend() == "torch":
        import torch

        args = [ops.convert_to_tensor(hidden), ops.convert_to_tensor(kernel)]
        args[index].requires_grad_(True)
        value = fn(*args)
        (grad,) = torch.autograd.grad(value, args[index])
        return np_(value.detach()), np_(grad)
    import tensorflow as tf

    args = [tf.constant(hidden), tf.constant(kernel)]
    with tf.GradientTape() as tape:
        tape.watch(args[index])
        value = fn(*args)
    return value.numpy(), tape.gradient(value, args[index]).numpy()


def test_chunked_cross_entropy_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        mtp_ops.chunked_cross_entropy(
            np.zeros((1, 2, 3)),
            np.zeros((3, 4)),
            np.zeros((1, 2)),
            np.zeros((1, 2)),
            0,
        )


def make_head(kind):
    """`(head, kernel)` of a keras-hub `ReversibleEmbedding` (V=11, d=6), as
    MTPCausalLM reads it: `backbones.apply_head` and `head_kernel`."""
    keras.utils.set_random_seed(0)
    embedding = keras_hub.layers.ReversibleEmbedding(
        11,
        6,
        tie_weights=kind != "untied",
        logit_soft_cap=2.0 if kind == "soft_cap" else None,
        reverse_dtype="float32" if kind == "soft_cap" else None,
        embeddings_initializer="normal",
    )
    embedding.build((None,))
    kernel = np_(backbones.head_kernel(embedding, detach=True))

    def head(hidden, kernel):
        return backbones.apply_head(embedding, hidden, kernel)

    return head, kernel


def group_losses(head, hidden, kernel, targets, weights, chunk_size=None):
    """`(losses, accuracies)` per group: chunked, or dense when no chunk."""
    if chunk_size:
        return mtp_ops.chunked_cross_entropy(
            hidden, kernel, targets, weights, chunk_size, head=head
        )
    losses, accuracies = [], []
    for g in range(hidden.shape[0]):
        logits = head(hidden[g], kernel)
        losses.append(
            mtp_ops.masked_cross_entropy(logits, targets[g], weights[g])
        )
        accuracies.append(
            mtp_ops.masked_accuracy(logits, targets[g], weights[g])
        )
    return ops.stack(losses), ops.stack(accuracies)


@pytest.mark.parametrize("kind", ["tied", "untied", "soft_cap"])
@pytest.mark.parametrize("coefficients", [(1, 1, 1), (1, 0.5, -2)])
def test_chunked_gradients_equal_dense_for_every_head(kind, coefficients):
    # 3 groups of 2 x 5 tokens in chunks of 4 (padded); group 1 has no
    # weight at all. Equal coefficients keep the fused kernel gradient;
    # others make the backward pass recompute it per chunk.
    head, kernel = make_head(kind)
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 2, 5, 6)).astype("float32")
    targets = rng.integers(0, 11, size=(3, 2, 5))
    weights = rng.integers(0, 2, size=(3, 2, 5)).astype("float32")
    weights[1] = 0.0
    coefficients = np.array(coefficients, "float32")

    def loss(chunk_size):
        def fn(h, k):
            losses, _ = group_losses(head, h, k, targets, weights, chunk_size)
            return ops.sum(ops.multiply(losses, coefficients))

        return fn

    dense = group_losses(head, hidden, kernel, targets, weights)
    chunked = group_losses(head, hidden, kernel, targets, weights, 4)
    for a, b in zip(dense, chunked):
        np.testing.assert_allclose(np_(a), np_(b), atol=1e-6)
    assert np_(chunked[0])[1] == 0.0 and np_(chunked[1])[1] == 0.0
    for index in (0, 1):  # the hidden states, the kernel
        (value, grad), (dense_value, dense_grad) = [
            value_and_grad(loss(c), hidden, kernel, index) for c in (4, None)
        ]
        np.testing.assert_allclose(value, dense_value, atol=1e-5)
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, dense_grad, atol=1e-5)
        if index == 0:
            np.testing.assert_array_equal(grad[1], 0.0)  # no weight, no grad


def test_chunked_all_zero_weights_give_zero_loss_and_gradient():
    head, kernel = make_head("tied")
    hidden = np.ones((1, 8, 6), "float32")
    zero = np.zeros((1, 8), "float32")

    def fn(h, k):
        return mtp_ops.chunked_cross_entropy(h, k, zero, zero, 3, head)[0][0]

    for index in (0, 1):
        value, grad = value_and_grad(fn, hidden, kernel, index)
        assert value == 0.0
        np.testing.assert_array_equal(grad, 0.0)


def test_chunked_hidden_gradient_with_detached_kernel():
    # MTP's detach_trunk passes a stop_gradient'ed kernel.
    head, kernel = make_head("tied")
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(2, 7, 6)).astype("float32")
    targets = rng.integers(0, 11, size=(2, 7))
    weights = np.ones((2, 7), "float32")

    def loss(chunk_size):
        def fn(h, k):
            k = ops.stop_gradient(k)
            losses, _ = group_losses(head, h, k, targets, weights, chunk_size)
            return ops.sum(losses)

        return fn

    (_, grad), (_, dense_grad) = [
        value_and_grad(loss(c), hidden, kernel, 0) for c in (3, None)
    ]
    np.testing.assert_allclose(grad, dense_grad, atol=1e-5)


def test_chunked_accuracy_breaks_ties_like_argmax():
    # Logits h * [0, 1, 3, 2, 3, 0]: indices 2 and 4 tie for the maximum,
    # so argmax (the first maximum) says 2; at h = 0 all tie and it says 0.
    row = np.array([[0, 1, 3, 2, 3, 0]], "float32")
    scales = np.array([1.0, 2.0, 0.0, 1.0, 0.0, 0.5], "float32")
    hidden = scales.reshape(1, 6, 1)
    targets = np.array([[2, 4, 0, 1, 5, 2]])
    weights = np.ones((1, 6), "float32")
    _, accuracy = mtp_ops.chunked_cross_entropy(
        hidden, row, targets, weights, 4
    )
    expected = mtp_ops.masked_accuracy(hidden[0] @ row, targets[0], weights)
    np.testing.assert_allclose(np_(accuracy)[0], np_(expected), atol=1e-6)
    np.testing.assert_allclose(np_(accuracy)[0], 3 / 6, atol=1e-6)


def numpy_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_top1_soft_cross_entropy_and_acceptance_match_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 7)).astype("float32")
    logits[0, 1, [2, 5]] = 9.0  # a tie: the first maximum wins, as argmax
    teacher = rng.normal(size=(2, 5, 7)).astype("float32")
    np.testing.assert_array_equal(
        np_(mtp_ops.top1(logits)), np.argmax(logits, -1)
    )
    z, p = logits.astype("float64"), numpy_softmax(teacher.astype("float64"))
    lse = np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(
        np_(mtp_ops.soft_cross_entropy(logits, teacher)),
        lse - (p * z).sum(-1),
        atol=1e-5,
    )
    # Acceptance: depth k's draft at i against the main top-1 at i + k.
    main = rng.integers(0, 3, size=(2, 6))
    drafts = rng.integers(0, 3, size=(2, 2, 6))  # (D, B, T)
    weights = rng.integers(0, 2, size=(2, 2, 6)).astype("float32")
    weights[:, :, -2:] = 0.0  # i + k + 1 >= T carries no weight
    weights[1, :, :] = 0.0  # an empty depth gives 0, not NaN
    expected = []
    for k in (1, 2):
        hits = total = 0.0
        for b in range(2):
            for i in range(6 - k):
                hits += weights[k - 1, b, i] * (
                    drafts[k - 1, b, i] == main[b, i + k]
                )
                total += weights[k - 1, b, i]
        expected.append(hits / max(total, 1.0))
    np.testing.assert_allclose(
        np_(mtp_ops.masked_acceptance(drafts, main, weights)),
        expected,
        atol=1e-6,
    )


def value_and_grads(fn, *args):
    """`(value, [gradient w.r.t. each argument])` on the active backend."""
    if keras.config.backend() == "jax":
        import jax

        argnums = tuple(range(len(args)))
        value, grads = jax.value_and_grad(fn, argnums=argnums)(*args)
        return np.asarray(value), [np.asarray(g) for g in grads]
    if keras.config.backend() == "torch":
        import torch

        args = [ops.convert_to_tensor(a).requires_grad_(True) for a in args]
        value = fn(*args)
        grads = torch.autograd.grad(value, args, allow_unused=True)
        grads = [
            np.zeros(a.shape) if g is None else np_(g)
            for a, g in zip(args, grads)
        ]
        return np_(value.detach()), grads
    import tensorflow as tf

    args = [tf.constant(a) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(args)
        value = fn(*args)
    grads = tape.gradient(value, args)
    grads = [
        np.zeros(a.shape) if g is None else g.numpy()
        for a, g in zip(args, grads)
    ]
    return value.numpy(), grads


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_distilled_loss_and_gradients_match_numpy(chunk_size):
    # 2 groups (depths) of 2 x 5 tokens, chunks of 4 (padded): soft CE of
    # the student `h @ W` against softmax(teacher @ W); the teacher gets no
    # gradient, and the kernel only the student's.
    rng = np.random.default_rng(4)
    hidden = rng.normal(size=(2, 2, 5, 6)).astype("float32")
    teacher = rng.normal(size=(2, 2, 5, 6)).astype("float32")
    kernel = rng.normal(size=(6, 11)).astype("float32")
    targets = rng.integers(0, 11, size=(2, 2, 5))
    weights = rng.integers(0, 2, size=(2, 2, 5)).astype("float32")
    outputs = {}

    def fn(h, k, t):
        if chunk_size:
            losses, accuracies, predictions = mtp_ops.chunked_cross_entropy(
                h,
                k,
                targets,
                weights,
                chunk_size,
                teacher_hidden_states=t,
                return_predictions=True,
            )
        else:
            losses, accuracies, predictions = [], [], []
            for g in range(2):
                z = ops.matmul(h[g], k)
                ce = mtp_ops.soft_cross_entropy(z, ops.matmul(t[g], k))
                losses.append(mtp_ops.weighted_mean(ce, weights[g]))
                accuracies.append(
                    mtp_ops.masked_accuracy(z, targets[g], weights[g])
                )
                predictions.append(mtp_ops.top1(z))
            losses, accuracies = ops.stack(losses), ops.stack(accuracies)
            predictions = ops.stack(predictions)
        outputs.update(accuracies=accuracies, predictions=predictions)
        return ops.sum(losses)

    value, (grad_h, grad_k, grad_t) = value_and_grads(
        fn, hidden, kernel, teacher
    )
    fn(hidden, kernel, teacher)  # eagerly, for the accuracies and ids
    # NumPy, float64.
    z = hidden.astype("float64") @ kernel
    p = numpy_softmax(teacher.astype("float64") @ kernel)
    lse = np.log(np.exp(z).sum(-1))
    count = np.maximum(weights.sum((1, 2), keepdims=True), 1.0)
    scale = weights / count  # (G, B, T)
    expected = (scale * (lse - (p * z).sum(-1))).sum()
    dz = (numpy_softmax(z) - p) * scale[..., None]
    predictions = z.argmax(-1)
    accuracies = (scale * (predictions == targets)).sum((1, 2))
    np.testing.assert_allclose(value, expected, atol=1e-5)
    np.testing.assert_allclose(grad_h, dz @ kernel.T, atol=1e-5)
    np.testing.assert_allclose(
        grad_k, np.einsum("gbtd,gbtv->dv", hidden, dz), atol=1e-5
    )
    np.testing.assert_array_equal(grad_t, 0.0)
    np.testing.assert_allclose(
        np_(outputs["accuracies"]), accuracies, atol=1e-6
    )
    np.testing.assert_array_equal(np_(outputs["predictions"]), predictions)
