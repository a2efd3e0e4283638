"""Pure `keras.ops` functions of the MTP objective.

Notation (docs/objective.md): `x` token ids `(B, T)`, `m` padding mask
(1 = real token), optional `s` segment ids (0 = padding). Depth `k` predicts
`x[i + k + 1]` from position `i`.
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
    hits = ops.cast(top1(logits) == ops.cast(targets, "int32"), "float32")
    return weighted_mean(hits, weights)


def top1(logits):
    """The top-1 ids `argmax(z)` of `logits` `(..., V)`, int32 `(...)`.

    Ties go to the first maximum. A plain `argmax`: the `min` over a
    `where(z >= max(z))` that the chunked loss uses (faster on XLA's CPU)
    would make a `(..., V)` mask here, 64 MiB more of a dense step's memory
    at B=8, T=256, V=32768 (tests/test_memory.py).
    """
    return ops.cast(ops.argmax(logits, axis=-1), "int32")


def soft_cross_entropy(logits, teacher_logits):
    """Per-token cross-entropy against a soft target, in float32:
    `logsumexp(z) - sum_v softmax(t)_v z_v`.

    Equal to `KL(softmax(t) || softmax(z))` plus the teacher's entropy, a
    constant of `z`; its gradient w.r.t. `z` is `softmax(z) - softmax(t)`.
    No gradient flows to `teacher_logits`.

    Args:
        logits: float tensor `(..., V)`, the student's `z`.
        teacher_logits: float tensor `(..., V)`, the teacher's `t`.

    Returns:
        float32 tensor `(...)`.
    """
    logits = ops.cast(logits, "float32")
    teacher = ops.softmax(
        ops.stop_gradient(ops.cast(teacher_logits, "float32")), axis=-1
    )
    return ops.logsumexp(logits, axis=-1) - ops.sum(teacher * logits, axis=-1)


def masked_acceptance(draft_ids, main_ids, weights):
    """Per-depth share of valid positions where depth `k`'s draft equals the
    main head's top-1 for the same token, `(D,)` float32.

    Depth `k` at position `i` and the main head at position `i + k` both
    predict `x[i + k + 1]`: the draft `draft_ids[k - 1, :, i]` is accepted
    by greedy speculation (after the earlier drafts were) if it equals
    `main_ids[:, i + k]`. Token-weighted like `masked_accuracy`.

    Args:
        draft_ids: int tensor `(D, B, T)`, depth `k`'s top-1 at row `k - 1`.
        main_ids: int tensor `(B, T)`, the main head's top-1.
        weights: float tensor `(D, B, T)`, `w^k` of each depth.
    """
    main_ids = ops.cast(main_ids, "int32")
    draft_ids = ops.cast(draft_ids, "int32")
    rates = []
    for k in range(1, draft_ids.shape[0] + 1):
        hits = draft_ids[k - 1] == roll_and_mask(main_ids, -k)
        rates.append(weighted_mean(ops.cast(hits, "float32"), weights[k - 1]))
    return ops.stack(rates)


# Backends where `chunked_cross_entropy` fuses the loss with its gradient;
# the others rematerialize. Fused is the faster on all three (CPU, loss and
# its gradients alone, 2048 tokens, d=256, V=32768; time / dense): JAX 0.75
# (remat 1.1), TensorFlow 0.86-0.97 (remat 1.3-1.5), torch 1.07 with chunks
# of 512, 1.6 of 128 (remat 1.3, 1.8). `bench_train.py --compare-chunk`
# measures whole training steps.
FUSED_LOSS_BACKENDS = ("jax", "tensorflow", "torch")


def chunked_cross_entropy(
    hidden_states,
    kernel,
    targets,
    weights,
    chunk_size,
    head=None,
    teacher_hidden_states=None,
    return_predictions=False,
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

    With `teacher_hidden_states`, the loss is instead `soft_cross_entropy`
    against the teacher logits `head(teacher_hidden_states, kernel)`, made
    chunk by chunk beside the student's under stop-gradient (no gradient
    reaches the teacher's hidden states or, through them, the kernel); the
    accuracy still counts `targets`.

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
        teacher_hidden_states: optional float tensor of the shape of
            `hidden_states`: each token's teacher input to `head`.
        return_predictions: bool. If True, also return every token's top-1
            id (`top1` of its logits), int32 `(G, ...)`.

    Returns:
        `(losses, accuracies)`, float32 tensors `(G,)`, and the predictions
        if asked.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"`chunk_size` must be an int >= 1. Received: {chunk_size!r}"
        )
    head = head or ops.matmul
    kernel = ops.convert_to_tensor(kernel)
    groups, dim = hidden_states.shape[0], hidden_states.shape[-1]
    token_shape = ops.shape(targets)
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
    tokens = ops.shape(hidden)[1]
    pad = (-tokens) % chunk_size
    chunks = [  # group-major, so each chunk holds one group's tokens
        ops.reshape(
            ops.pad(hidden, [[0, 0], [0, pad], [0, 0]]), (-1, chunk_size, dim)
        ),
        ops.reshape(ops.pad(targets, [[0, 0], [0, pad]]), (-1, chunk_size)),
        ops.reshape(ops.pad(scale, [[0, 0], [0, pad]]), (-1, chunk_size)),
    ]
    if teacher_hidden_states is not None:
        teacher = ops.stop_gradient(
            ops.reshape(teacher_hidden_states, (groups, -1, dim))
        )
        teacher = ops.pad(teacher, [[0, 0], [0, pad], [0, 0]])
        chunks.append(ops.reshape(teacher, (-1, chunk_size, dim)))
    fused = keras.config.backend() in FUSED_LOSS_BACKENDS
    if fused and _may_need_gradients(hidden, kernel):
        sums = _fused_chunk_sums(head, kernel, *chunks)
    else:
        sums = _remat_chunk_sums(head, kernel, *chunks)
    # sums: (M, 2 + chunk_size): the two sums, then the chunk's top-1 ids.
    sums = ops.reshape(sums, (groups, -1, 2 + chunk_size))
    losses = ops.sum(sums[:, :, 0], axis=1)  # (G,)
    accuracies = ops.sum(sums[:, :, 1], axis=1)
    if not return_predictions:
        return losses, accuracies
    predictions = ops.reshape(sums[:, :, 2:], (groups, -1))[:, :tokens]
    predictions = ops.cast(ops.stop_gradient(predictions), "int32")
    return losses, accuracies, ops.reshape(predictions, token_shape)


def _may_need_gradients(*tensors):
    """False where the backend tells that no gradient of `tensors` is
    recorded (torch's `no_grad`, as in `evaluate`): the fused loss would
    make them for nothing. Under `jit`, XLA drops that unused work itself.
    """
    if keras.config.backend() != "torch":
        return True
    import torch

    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _chunk_loss(logits, targets, scale, teacher_logits=None, grad=True):
    """`([sum(scale * CE), sum(scale * hits)], top-1 ids, d/d(logits) of the
    first)` of one chunk's logits `(n, V)`, all float32 (the gradient None
    unless `grad`).

    `CE` is against `targets`, or against `softmax(teacher_logits)` if
    given (`soft_cross_entropy`); hits always count `targets`.
    """
    logits = ops.cast(logits, "float32")
    targets = ops.cast(targets, "int32")
    row_max = ops.max(logits, axis=-1, keepdims=True)
    exp = ops.exp(logits - row_max)
    total = ops.sum(exp, axis=-1, keepdims=True)
    log_total = ops.squeeze(ops.log(total) + row_max, -1)
    ids = ops.expand_dims(ops.arange(ops.shape(logits)[-1], dtype="int32"), 0)
    predictions = ops.min(  # `top1`, reusing the row maximum
        ops.where(logits >= row_max, ids, ops.shape(logits)[-1]), axis=-1
    )
    hits = ops.cast(predictions == targets, "float32")
    scale = ops.expand_dims(scale, -1)
    logits_grad = None
    if teacher_logits is None:
        target_logits = ops.take_along_axis(
            logits, ops.expand_dims(targets, -1), axis=-1
        )
        ce = log_total - ops.squeeze(target_logits, -1)
        if grad:  # (softmax - onehot) * scale
            logits_grad = exp * (scale / total) - ops.where(
                ids == ops.expand_dims(targets, -1), scale, 0.0
            )
    else:
        teacher = ops.softmax(
            ops.stop_gradient(ops.cast(teacher_logits, "float32")), axis=-1
        )
        ce = log_total - ops.sum(teacher * logits, axis=-1)
        if grad:  # (softmax - teacher) * scale
            logits_grad = (exp / total - teacher) * scale
    sums = ops.stack([ops.sum(ce * scale[:, 0]), ops.sum(hits * scale[:, 0])])
    return sums, ops.cast(predictions, "float32"), logits_grad


def _fused_chunk_sums(head, kernel, hidden, targets, scale, *teacher):
    """Chunk outputs `(M, 2 + n)` of `chunked_cross_entropy` (the two sums,
    then the chunk's `n` top-1 ids), with the gradient made in the forward
    pass (`_vjp` of `head` on each chunk). `teacher`: optional teacher
    hidden states `(M, n, d)`, given no gradient.

    The kernel gradient is kept as one sum over all chunks: exact when every
    chunk gets the same upstream gradient (the groups' losses summed or
    averaged). Otherwise the backward pass recomputes it chunk by chunk, in
    a `while_loop` that runs no step in the common case (a `cond` would
    hold a second `(d, V)` buffer).
    """

    def chunk_grads(kernel, hidden, targets, scale, *teacher):
        logits, pullback = _vjp(head, hidden, kernel)
        teacher_logits = None
        if teacher:
            teacher_logits = ops.stop_gradient(head(teacher[0], kernel))
        sums, predictions, logits_grad = _chunk_loss(
            logits, targets, scale, teacher_logits
        )
        hidden_grad, kernel_grad = pullback(ops.cast(logits_grad, logits.dtype))
        return (
            ops.concatenate([sums, predictions]),
            hidden_grad,
            ops.cast(kernel_grad, "float32"),
        )

    @ops.custom_gradient
    def fused(hidden, kernel, targets, scale, *teacher):
        def step(kernel_grad, chunk):
            sums, hidden_grad, chunk_kernel_grad = chunk_grads(kernel, *chunk)
            return kernel_grad + chunk_kernel_grad, (sums, hidden_grad)

        xs, dtypes = (
            (hidden, targets, scale, *teacher),
            ("float32", hidden.dtype),
        )
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
                chunk += tuple(t[i] for t in teacher)
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
                *(ops.zeros_like(t) for t in teacher),
            )

        return sums, grad

    return fused(hidden, kernel, targets, scale, *teacher)


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


def _remat_chunk_sums(head, kernel, hidden, targets, scale, *teacher):
    """Chunk outputs `(M, 2 + n)` of `chunked_cross_entropy` by `ops.map`
    over a rematerialized chunk function (the backward pass recomputes the
    logits)."""

    @keras.remat
    def chunk_sums(kernel, hidden, targets, scale, *teacher):
        logits = head(hidden, kernel)  # (chunk_size, V): the only live logits
        teacher_logits = None
        if teacher:
            teacher_logits = ops.stop_gradient(head(teacher[0], kernel))
        sums, predictions, _ = _chunk_loss(
            logits, targets, scale, teacher_logits, grad=False
        )
        return ops.concatenate([sums, ops.stop_gradient(predictions)])

    chunks = (hidden, targets, scale, *teacher)
    return ops.map(lambda chunk: chunk_sums(kernel, *chunk), chunks)
