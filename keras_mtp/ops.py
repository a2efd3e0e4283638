"""Pure `keras.ops` functions of the MTP objective.

Notation (DESIGN.md): `x` token ids `(B, T)`, `m` padding mask (1 = real token),
optional `s` segment ids (0 = padding). Depth `k` predicts `x[i + k + 1]` from
position `i`.
"""

import keras
from keras import ops


def roll_and_mask(x, shift=-1):
    """Rolls `x` along axis 1 by `shift` and zeros the wrapped positions.

    MaxText's meaning: `roll_and_mask([1, ..., 8], -1) == [2, ..., 8, 0]`.
    Static shapes (shift and mask, never slice), so one trace serves every
    sequence length and the result shards like its input.

    Args:
        x: tensor of rank >= 2, `(B, T, ...)`.
        shift: int. Positions to roll by along axis 1; negative moves values
            towards the start, as in `numpy.roll`.
    """
    if not isinstance(shift, int):
        raise ValueError(f"`shift` must be an int. Received: shift={shift!r}")
    if len(x.shape) < 2:
        raise ValueError(
            "`roll_and_mask` needs a tensor of rank >= 2 (batch, length, ...). "
            f"Received: shape={x.shape}"
        )
    if shift == 0:
        return x
    length = ops.shape(x)[1]
    rolled = ops.roll(x, shift, axis=1)
    positions = ops.arange(length)
    if shift < 0:
        keep = positions < length + shift  # the last |shift| wrapped around
    else:
        keep = positions >= shift  # the first `shift` wrapped around
    keep = ops.reshape(keep, (1, -1) + (1,) * (len(x.shape) - 2))
    return ops.where(keep, rolled, ops.zeros_like(rolled))


def mtp_targets_and_weights(token_ids, padding_mask, depth, segment_ids=None):
    """Targets `t^k` and 0/1 loss weights `w^k` of MTP depth `k`.

    `t^k_i = x[i + k + 1]` (0 beyond the end) and `w^k_i = 1` only if
    `i + k + 1 < T`, `m[i + k + 1] = 1`, `m[i] = 1` and, when `segment_ids` is
    given, `s` holds the same non-zero value on `i .. i + k + 1`.

    Args:
        token_ids: int tensor `(B, T)`.
        padding_mask: tensor `(B, T)`, 1 (or True) for real tokens.
        depth: int >= 1. The MTP depth `k`.
        segment_ids: optional int tensor `(B, T)` of packed rows, 0 = padding.

    Returns:
        `(targets, weights)`: int32 `(B, T)` and float32 `(B, T)` of 0/1.
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(
            f"`depth` must be an int >= 1. Received: depth={depth!r}"
        )
    ahead = depth + 1
    targets = roll_and_mask(ops.cast(token_ids, "int32"), -ahead)
    mask = ops.cast(padding_mask, "bool")
    # The rolled mask is False wherever i + k + 1 >= T.
    valid = ops.logical_and(mask, roll_and_mask(mask, -ahead))
    if segment_ids is not None:
        segments = ops.cast(segment_ids, "int32")
        valid = ops.logical_and(valid, segments != 0)
        for j in range(1, ahead + 1):
            # Beyond the end the roll gives 0, never equal to a real segment.
            same = roll_and_mask(segments, -j) == segments
            valid = ops.logical_and(valid, same)
    return targets, ops.cast(valid, "float32")


def sparse_cross_entropy(logits, targets):
    """Per-token cross-entropy `logsumexp(z) - z[t]`, in float32.

    No one-hot `(B, T, V)` tensor is made, unlike Keras'
    `SparseCategoricalCrossentropy` on JAX.

    Args:
        logits: float tensor `(..., V)`.
        targets: int tensor `(...)` of ids in `[0, V)`.

    Returns:
        float32 tensor of the shape of `targets`.
    """
    logits = ops.cast(logits, "float32")
    targets = ops.cast(targets, "int32")
    target_logits = ops.take_along_axis(
        logits, ops.expand_dims(targets, -1), axis=-1
    )
    return ops.logsumexp(logits, axis=-1) - ops.squeeze(target_logits, -1)


def weighted_mean(values, weights):
    """`sum(w * v) / max(sum(w), 1)` over all entries: 0 for an empty mask."""
    values = ops.cast(values, "float32")
    weights = ops.cast(weights, "float32")
    total = ops.sum(values * weights)
    return total / ops.maximum(ops.sum(weights), 1.0)


def masked_cross_entropy(logits, targets, weights):
    """Token-weighted cross-entropy `sum(w * CE) / max(sum(w), 1)` (float32)."""
    return weighted_mean(sparse_cross_entropy(logits, targets), weights)


def masked_accuracy(logits, targets, weights):
    """Token-weighted top-1 accuracy of `logits` against `targets`."""
    predictions = ops.cast(ops.argmax(logits, axis=-1), "int32")
    hits = ops.cast(predictions == ops.cast(targets, "int32"), "float32")
    return weighted_mean(hits, weights)


def chunked_cross_entropy(
    hidden_states, kernel, targets, weights, chunk_size, head=None
):
    """Per-group `masked_cross_entropy` and `masked_accuracy` of the logits
    `head(hidden_states, kernel)`, computed `chunk_size` tokens at a time.

    Each chunk's logits are made, reduced to two sums and dropped; the
    backward pass recomputes them (`keras.remat`), so no `(B, T, V)` logits
    tensor ever lives: peak memory holds one chunk's `(chunk_size, V)`. All
    groups (the MTP depths) go through one loop, so the head's gradient
    accumulates in one `(d, V)` buffer. Equal to the dense computation up to
    float32 summation order.

    Args:
        hidden_states: float tensor `(G, ..., d)`: `G` groups of tokens.
        kernel: float tensor, the output head's kernel (`(d, V)` for the
            default `head`). It is an explicit argument of the
            rematerialized function, so every backend differentiates it
            (TensorFlow's `recompute_grad` drops the gradients of tensors a
            function only captures).
        targets: int tensor `(G, ...)`.
        weights: float tensor `(G, ...)` of 0/1 loss weights.
        chunk_size: int >= 1. Tokens per chunk; each group is padded with
            zero-weight tokens to whole chunks.
        head: callable `(hidden (n, d), kernel) -> logits (n, V)`; defaults
            to `matmul`.

    Returns:
        `(losses, accuracies)`, float32 tensors `(G,)`.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"`chunk_size` must be an int >= 1. Received: {chunk_size!r}"
        )
    head = head or ops.matmul
    groups, dim = hidden_states.shape[0], hidden_states.shape[-1]
    hidden = ops.reshape(hidden_states, (groups, -1, dim))  # (G, N, d)
    # Float ids (exact below 2^24) keep TF's recompute_grad from warning
    # about watching an int tensor.
    targets = ops.reshape(ops.cast(targets, "float32"), (groups, -1))
    weights = ops.reshape(ops.cast(weights, "float32"), (groups, -1))
    pad = (-ops.shape(hidden)[1]) % chunk_size
    hidden = ops.pad(hidden, [[0, 0], [0, pad], [0, 0]])
    targets = ops.pad(targets, [[0, 0], [0, pad]])
    weights = ops.pad(weights, [[0, 0], [0, pad]])

    @keras.remat
    def chunk_sums(hidden, targets, weights, kernel):
        logits = head(hidden, kernel)  # (chunk_size, V): the only live logits
        targets = ops.cast(targets, "int32")
        ce = sparse_cross_entropy(logits, targets)
        predictions = ops.cast(ops.argmax(logits, axis=-1), "int32")
        hits = ops.cast(predictions == targets, "float32")
        return ops.stack([ops.sum(ce * weights), ops.sum(hits * weights)])

    chunks = (  # group-major, so each chunk holds one group's tokens
        ops.reshape(hidden, (-1, chunk_size, dim)),
        ops.reshape(targets, (-1, chunk_size)),
        ops.reshape(weights, (-1, chunk_size)),
    )
    sums = ops.map(lambda chunk: chunk_sums(*chunk, kernel), chunks)
    sums = ops.sum(ops.reshape(sums, (groups, -1, 2)), axis=1)  # (G, 2)
    count = ops.maximum(ops.sum(weights, axis=1), 1.0)  # (G,)
    return sums[:, 0] / count, sums[:, 1] / count
