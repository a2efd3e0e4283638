"""Pure `keras.ops` functions of the MTP objective.

Notation (docs/objective.md): `x` token ids `(B, T)`, `m` padding mask
(1 = real token), optional `s` segment ids (0 = padding). Depth `k` predicts
`x[i + k + 1]` from position `i`.
"""

import keras
import numpy as np
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


# Backends where `chunked_cross_entropy` fuses the loss with its gradient;
# the others rematerialize. Fused is the faster on all three (CPU, loss and
# its gradients alone, 2048 tokens, d=256, V=32768; time / dense): JAX 0.75
# (remat 1.1), TensorFlow 0.86-0.97 (remat 1.3-1.5), torch 1.07 with chunks
# of 512, 1.6 of 128 (remat 1.3, 1.8). `bench_train.py --compare-chunk`
# measures whole training steps.
FUSED_LOSS_BACKENDS = ("jax", "tensorflow", "torch")


def chunked_cross_entropy(
    hidden_states, kernel, targets, weights, chunk_size, head=None
):
    """Per-group `masked_cross_entropy` and `masked_accuracy` of the logits
    `head(hidden_states, kernel)`, computed `chunk_size` tokens at a time.

    Each chunk's logits are made, reduced and dropped, so no `(B, T, V)`
    logits tensor ever lives: peak memory holds one chunk's `(chunk_size,
    V)`. On JAX, TensorFlow and torch the loss is fused with its gradient
    (`_fused_chunk_sums`): each chunk's forward pass also makes the
    gradients of its loss w.r.t. its hidden states and (accumulated over
    chunks, in one buffer) the kernel, so the backward pass only scales
    them: three head matmuls per chunk, as dense, where rematerialization
    took four. Other backends, and torch under `no_grad`, rematerialize
    (`keras.remat`). All groups (the MTP depths) go through one loop, hence
    one `(d, V)` head-gradient buffer. Equal to the dense computation up to
    float32 summation order.

    Args:
        hidden_states: float tensor `(G, ..., d)`: `G` groups of tokens.
        kernel: float tensor, the output head's kernel (`(d, V)` for the
            default `head`). Pass a tensor, not a variable: it is an
            explicit argument of the chunk functions, so every backend
            differentiates it.
        targets: int tensor `(G, ...)`.
        weights: float tensor `(G, ...)` of 0/1 loss weights; constants (no
            gradient flows to them).
        chunk_size: int >= 1. Tokens per chunk; each group is padded with
            zero-weight tokens to whole chunks.
        head: callable `(hidden (n, d), kernel) -> logits (n, V)`; defaults
            to `matmul`. Differentiated by the backend's autodiff, so any
            head works (tied or untied, casts, logit soft-cap).

    Returns:
        `(losses, accuracies)`, float32 tensors `(G,)`.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"`chunk_size` must be an int >= 1. Received: {chunk_size!r}"
        )
    head = head or ops.matmul
    kernel = ops.convert_to_tensor(kernel)
    groups, dim = hidden_states.shape[0], hidden_states.shape[-1]
    hidden = ops.reshape(hidden_states, (groups, -1, dim))  # (G, N, d)
    # Float ids (exact below 2^24): the chunk functions take them as
    # arguments, and TF's recompute_grad warns about watching int tensors.
    targets = ops.reshape(ops.cast(targets, "float32"), (groups, -1))
    weights = ops.reshape(ops.cast(weights, "float32"), (groups, -1))
    # d(loss_g) / d(CE_i): every chunk sum is already a share of its
    # group's loss, so the upstream gradient of all chunks of all groups is
    # one number whenever the groups' losses are summed or averaged.
    count = ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1.0)
    scale = ops.stop_gradient(weights / count)
    pad = (-ops.shape(hidden)[1]) % chunk_size
    hidden = ops.pad(hidden, [[0, 0], [0, pad], [0, 0]])
    targets = ops.pad(targets, [[0, 0], [0, pad]])
    scale = ops.pad(scale, [[0, 0], [0, pad]])
    chunks = (  # group-major, so each chunk holds one group's tokens
        ops.reshape(hidden, (-1, chunk_size, dim)),
        ops.reshape(targets, (-1, chunk_size)),
        ops.reshape(scale, (-1, chunk_size)),
    )
    fused = keras.config.backend() in FUSED_LOSS_BACKENDS
    if fused and _may_need_gradients(hidden, kernel):
        sums = _fused_chunk_sums(head, kernel, *chunks)
    else:
        sums = _remat_chunk_sums(head, kernel, *chunks)
    sums = ops.sum(ops.reshape(sums, (groups, -1, 2)), axis=1)  # (G, 2)
    return sums[:, 0], sums[:, 1]


def _may_need_gradients(*tensors):
    """False where the backend tells that no gradient of `tensors` is
    recorded (torch's `no_grad`, as in `evaluate`): the fused loss would
    make them for nothing. Under `jit`, XLA drops that unused work itself.
    """
    if keras.config.backend() != "torch":
        return True
    import torch

    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _chunk_loss(logits, targets, scale):
    """`(sum(scale * CE), sum(scale * hits), d/d(logits) of the first)` of
    one chunk's logits `(n, V)`, all float32."""
    logits = ops.cast(logits, "float32")
    targets = ops.cast(targets, "int32")
    row_max = ops.max(logits, axis=-1, keepdims=True)
    exp = ops.exp(logits - row_max)
    total = ops.sum(exp, axis=-1, keepdims=True)
    target_logits = ops.take_along_axis(
        logits, ops.expand_dims(targets, -1), axis=-1
    )
    ce = ops.squeeze(ops.log(total) + row_max - target_logits, -1)
    ids = ops.expand_dims(ops.arange(ops.shape(logits)[-1], dtype="int32"), 0)
    targets = ops.expand_dims(targets, -1)
    if keras.config.backend() == "jax":
        # argmax == target, as argmax breaks ties (the first maximum): no
        # maximum before the target. XLA's CPU argmax is ~6x slower than
        # these max reductions.
        earlier = ops.max(ops.where(ids < targets, logits, -np.inf), axis=-1)
        hits = ops.logical_and(
            target_logits[:, 0] >= row_max[:, 0], earlier < row_max[:, 0]
        )
    else:
        predictions = ops.cast(ops.argmax(logits, axis=-1), "int32")
        hits = predictions == targets[:, 0]
    scale = ops.expand_dims(scale, -1)
    # (softmax - onehot) * scale
    grad = exp * (scale / total) - ops.where(ids == targets, scale, 0.0)
    return (
        ops.sum(ce * scale[:, 0]),
        ops.sum(ops.cast(hits, "float32") * scale[:, 0]),
        grad,
    )


def _fused_chunk_sums(head, kernel, hidden, targets, scale):
    """Chunk sums `(M, 2)` of `chunked_cross_entropy`, with the gradient made
    in the forward pass (`_vjp` of `head` on each chunk).

    The kernel gradient is kept as one sum over all chunks: exact when every
    chunk gets the same upstream gradient (the groups' losses summed or
    averaged). Otherwise the backward pass recomputes it chunk by chunk, in
    a `while_loop` that runs no step in the common case (a `cond` would
    hold a second `(d, V)` buffer).
    """

    def chunk_grads(kernel, hidden, targets, scale):
        logits, pullback = _vjp(head, hidden, kernel)
        ce, hits, logits_grad = _chunk_loss(logits, targets, scale)
        hidden_grad, kernel_grad = pullback(ops.cast(logits_grad, logits.dtype))
        return (
            ops.stack([ce, hits]),
            hidden_grad,
            ops.cast(kernel_grad, "float32"),
        )

    @ops.custom_gradient
    def fused(hidden, kernel, targets, scale):
        def step(kernel_grad, chunk):
            sums, hidden_grad, chunk_kernel_grad = chunk_grads(kernel, *chunk)
            return kernel_grad + chunk_kernel_grad, (sums, hidden_grad)

        xs, dtypes = (hidden, targets, scale), ("float32", hidden.dtype)
        kernel_grad, (sums, hidden_grad) = _scan(
            step, ops.zeros(ops.shape(kernel), "float32"), xs, dtypes
        )

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            upstream = ops.cast(upstream[:, 0], "float32")  # (M,): the losses
            uniform = ops.all(upstream == upstream[0])

            def recompute(i, kernel_grad):
                chunk = (hidden[i], targets[i], scale[i] * upstream[i])
                return i + 1, kernel_grad + chunk_grads(kernel, *chunk)[2]

            _, kernel_grad_ = ops.while_loop(
                lambda i, _: i < ops.where(uniform, 0, ops.shape(upstream)[0]),
                recompute,
                (0, ops.where(uniform, kernel_grad * upstream[0], 0.0)),
            )
            hidden_grad_ = hidden_grad * ops.cast(
                ops.reshape(upstream, (-1, 1, 1)), hidden_grad.dtype
            )
            return (
                hidden_grad_,
                ops.cast(kernel_grad_, kernel.dtype),
                ops.zeros_like(targets),
                ops.zeros_like(scale),
            )

        return sums, grad

    return fused(hidden, kernel, targets, scale)


def _scan(step, carry, xs, dtypes):
    """`ops.scan(step, carry, xs)` where `step` outputs a tuple of tensors of
    `dtypes`: Keras' TensorFlow `scan` only stacks outputs shaped like the
    carry, so TensorFlow runs its own `while_loop`."""
    if keras.config.backend() != "tensorflow":
        return ops.scan(step, carry, xs)
    import tensorflow as tf

    length = tf.shape(xs[0])[0]

    def body(i, carry, arrays):
        carry, ys = step(carry, tuple(x[i] for x in xs))
        return i + 1, carry, tuple(a.write(i, y) for a, y in zip(arrays, ys))

    arrays = tuple(tf.TensorArray(dtype, size=length) for dtype in dtypes)
    _, carry, arrays = tf.while_loop(
        lambda i, *_: i < length, body, (0, carry, arrays)
    )
    return carry, tuple(a.stack() for a in arrays)


def _vjp(fn, *args):
    """`(fn(*args), pullback)` by the backend's autodiff: `pullback(cotangent)`
    returns the gradients w.r.t. `args`, as a tuple."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return jax.vjp(fn, *args)
    if backend == "torch":
        import torch

        return torch.func.vjp(fn, *args)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(args)
        out = fn(*args)
    return out, lambda cotangent: tuple(
        tape.gradient(out, args, output_gradients=cotangent)
    )


def _remat_chunk_sums(head, kernel, hidden, targets, scale):
    """Chunk sums `(M, 2)` of `chunked_cross_entropy` by `ops.map` over a
    rematerialized chunk function (the backward pass recomputes the logits).
    """

    @keras.remat
    def chunk_sums(hidden, targets, scale, kernel):
        logits = head(hidden, kernel)  # (chunk_size, V): the only live logits
        targets = ops.cast(targets, "int32")
        ce = sparse_cross_entropy(logits, targets)
        predictions = ops.cast(ops.argmax(logits, axis=-1), "int32")
        hits = ops.cast(predictions == targets, "float32")
        return ops.stack([ops.sum(ce * scale), ops.sum(hits * scale)])

    chunks = (hidden, targets, scale)
    return ops.map(lambda chunk: chunk_sums(*chunk, kernel), chunks)
