"""Self-speculative decoding with the MTP heads: greedy, or sampling.

The MTP depths, trained to predict the tokens 2, 3, ... ahead, draft `D`
tokens; the main model checks them all in one incremental forward pass over
its key/value cache and keeps a prefix of them, plus one token of its own.
Greedy: the drafts that equal its own greedy choices, so the output is the
main model's greedy decoding, token for token. Sampling (keras-hub's
`RandomSampler`, `TopKSampler`, `TopPSampler`): draft `x ~ q` (depth k's
distribution after the sampler's temperature and filtering), accept it with
probability `min(1, p(x) / q(x))` (`p` the main model's, after the same),
on rejection draw from `norm(max(0, p - q))`, and after `D` accepted drafts
a bonus token from `p` (Leviathan et al. 2023, Chen et al. 2023), so the
output is distributed as the sampler on the main model. Either way only the
number of main forward passes changes.

The loop (`_Loop`) keeps a named state (`_State`) and has three steps:

1. Prefill: the prompts through the main model, whose output at the
   shortest prompt's last position `first` gives the token `x_{first+1}`,
   then through every depth, whose outputs at `first` draft
   `x_{first+2} ..` (depth k reads `x_{first+k}`: the main model's token for
   k = 1, depth k-1's draft after it).
2. Verify, with `x_0 .. x_n` accepted and drafts `d_1 .. d_D` for the
   positions `n+1 .. n+D`: the main model runs over the window
   `[x_n, d_1, .., d_D]` at positions `n .. n+D` (keras-hub's
   `call_with_cache`), accepts `a` drafts by the rule above and adds one
   token of its own, so `n' = n + a + 1`.
3. Draft: depth `k` runs over the same window positions with its own
   cache: at position `i` it reads `h^{k-1}_i` and the token `x_{i+k}`
   (accepted, or the draft of an earlier depth), and its output at `n' - 1`
   drafts `x_{n'+k}`.

Window positions past `n'` are written to the caches too, but the next
window starts at `n'` and overwrites them, so every cached position below
the window holds accepted tokens only (the MTP caches hold what each depth
saw when the position was last in a window: for k >= 2 that can be an
earlier draft). Shapes are static, so the loop compiles (JAX `jit`,
TensorFlow `tf.function`). With learned position embeddings (GPT-2, OPT)
the caches end at `max_sequence_length`; windows near it start earlier,
over tokens already accepted, instead of reaching past it.

In a batch, all rows advance together by the smallest `a` among the rows
that have not stopped. A row that accepted more keeps its next accepted
draft in place of its own token and drops the later ones, which are
drafted and checked again: under sampling, every kept token is still a
draw from `p` given the tokens before it (an accepted draft and the
correction after a rejection are both draws from `p`, and which of them is
kept depends only on earlier draws and on the other rows). Rows whose
prompt is longer than the shortest one keep their prompt tokens, as
keras-hub's samplers do. Random draws hash `(seed, step, index)`
(`uniform`): the loop carries no random state.

Family differences (`keras_mtp.backbones.FAMILIES`):

- Key/value caches are keras-hub's: one stacked tensor, or a tuple of
  per-layer `(key, value)` (Gemma3); the prefill and the cache update take
  the prompt's mask where keras-hub's task does (Gemma3, Gemma4: prompt
  positions keep their prefill entries, as in its `generate`). Each depth's
  cache is shaped like that of the layer its block copies.
- Sliding-window layers (Mistral, Mixtral, Gemma3, Gemma4, Qwen, gpt-oss)
  keep full-length caches in keras-hub and mask by position from the cache
  index, for every query of a window: nothing to roll back.
- Recurrent layers (Qwen3.5's Gated DeltaNet) carry a state that a window
  advances past rejected drafts, and a state is not indexed by position.
  Verification runs those layers token by token (keras-hub's own
  single-token step) and keeps the state after each token; step 2 keeps the
  state after offset `a`. The prefill runs them token by token too, up to
  the first window's position. keras-hub's own Qwen3.5 `generate` is not
  the model's greedy decoding (see `Family.keras_hub_generate`);
  `generate(speculative=False)` then runs this loop without drafts.
"""

import functools
import typing

import keras
import keras_hub
import numpy as np
from keras import ops

from keras_mtp import backbones


def normalize_inputs(inputs, max_length):
    """`(token_ids, padding_mask)` int32 NumPy arrays `(B, max_length)`.

    `inputs` is keras-hub's format (a dict of `token_ids` and `padding_mask`,
    the mask marking the prompt) or prompts of equal length, `(B, T)` or
    `(T,)`. `max_length` pads them to that total length.
    """
    if isinstance(inputs, dict):
        if "token_ids" not in inputs:
            raise ValueError(
                "generate() takes a dict with `token_ids` and `padding_mask`. "
                f"Received keys: {sorted(inputs)}"
            )
        token_ids = np.asarray(ops.convert_to_numpy(inputs["token_ids"]))
        mask = inputs.get("padding_mask")
        mask = (
            np.ones_like(token_ids)
            if mask is None
            else np.asarray(ops.convert_to_numpy(mask))
        )
    else:
        token_ids = np.asarray(ops.convert_to_numpy(inputs))
        if token_ids.ndim == 1:
            token_ids = token_ids[None]
        mask = np.ones_like(token_ids)
    if token_ids.ndim != 2 or token_ids.shape != mask.shape:
        raise ValueError(
            "generate() takes token ids of shape (batch, length) and a "
            "padding mask of the same shape. Received: token_ids of shape "
            f"{token_ids.shape}, padding_mask of shape {mask.shape}"
        )
    if not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError(
            f"Token ids must be integers. Received dtype {token_ids.dtype}"
        )
    token_ids, mask = token_ids.astype("int32"), mask.astype(bool)
    lengths = mask.sum(axis=1)
    if lengths.size and lengths.min() < 1:
        raise ValueError(
            "Every prompt needs at least one token. Received prompt lengths "
            f"{lengths.tolist()}"
        )
    if max_length is not None:
        if max_length < token_ids.shape[1]:
            raise ValueError(
                f"`max_length`={max_length} is shorter than the inputs "
                f"({token_ids.shape[1]} tokens)"
            )
        pad = [(0, 0), (0, max_length - token_ids.shape[1])]
        token_ids, mask = np.pad(token_ids, pad), np.pad(mask, pad)
    return token_ids, mask.astype("int32")


def output_padding_mask(token_ids, prompt_mask, stop_token_ids):
    """keras-hub's output mask: the prompt, and each row's new tokens up to
    and including its first stop token."""
    if not stop_token_ids:
        return ops.ones_like(token_ids, dtype="bool")
    prompt_mask = ops.cast(prompt_mask, "bool")
    stops = _is_stop(token_ids, stop_token_ids)
    ends = ops.cast(stops & ops.logical_not(prompt_mask), "int32")
    after = ops.cumsum(ends, axis=-1) - ends  # stops strictly before
    return ops.logical_not(ops.cast(after, "bool"))


def _is_stop(token_ids, stop_token_ids):
    hits = [token_ids == stop for stop in stop_token_ids]
    return functools.reduce(ops.logical_or, hits)


def _argmax(logits):
    return ops.cast(ops.argmax(logits, axis=-1), "int32")


def _cache_length(backbone, length, depths):
    """How many positions the caches hold: `length + depths` (windows and
    drafts reach past `length`), at most the backbone's learned position
    embeddings, if it has any: windows then start earlier near the end
    (see `_Loop.verify`), never past the last position."""
    cache_length = length + depths
    limit = getattr(backbone, "max_sequence_length", None)
    if not backbones.family(backbone).learned_positions or limit is None:
        return cache_length
    if length > limit:
        raise ValueError(
            "`max_length` is beyond this backbone's learned position "
            f"embeddings: max_length = {length} > max_sequence_length = "
            f"{limit}. Use a smaller max_length."
        )
    if depths + 1 > limit:
        raise ValueError(
            f"A verification window of mtp_num_layers + 1 = {depths + 1} "
            f"positions does not fit in max_sequence_length = {limit}."
        )
    return min(cache_length, limit)


def _prefill(task, token_ids, prompt_mask, count):
    """`(hidden, cache)` of the main model over `token_ids`, exact for the
    positions `0 .. count - 1`: keras-hub's prefill, or `_recurrent_prefill`
    for families with recurrent layers."""
    if backbones.family(task.backbone).recurrent:
        return _recurrent_prefill(task, token_ids, count)
    return backbones.prefill(task, token_ids, prompt_mask)


def _verify(task, token_ids, cache, index, update_mask):
    """The main model over `token_ids` at positions `index ..`: keras-hub's
    `call_with_cache`, or `_recurrent_call_with_cache`, whose cache holds
    the recurrent states after each token (`_select` picks one)."""
    if backbones.family(task.backbone).recurrent:
        return _recurrent_call_with_cache(task, token_ids, cache, index)
    return backbones.call_with_cache(task, token_ids, cache, index, update_mask)


def _select(backbone, cache, accept):
    """The cache once the window's offsets `0 .. accept` are accepted.

    A key/value cache is indexed by position: entries past the accepted
    ones are overwritten by the next window before anything attends to
    them. A recurrent state is not: it must be the one after the last
    accepted token, not after the whole window.
    """
    if not backbones.family(backbone).recurrent:
        return cache
    key_value, conv_steps, recurrent_steps = cache
    return (
        key_value,
        ops.take(conv_steps, accept, axis=0),
        ops.take(recurrent_steps, accept, axis=0),
    )


def _recurrent_layers(backbone):
    f = backbones.family(backbone)
    return [
        not f.full_attention(layer) for layer in backbone.transformer_layers
    ]


def _hybrid_trunk(backbone, token_ids, cache, index, run_recurrent, steps=None):
    """The main model's layers over `token_ids` for a hybrid trunk (Qwen3.5):
    `(hidden, cache)`, the final norm's output and the new cache.

    The embeddings go through each layer with its slice of `cache`
    `(key_value, conv, recurrent)`. Full-attention layers run over all of
    `token_ids` at once, against their key/value cache at positions
    `index ..`. Recurrent layers (Gated DeltaNet) run
    `run_recurrent(layer, x, layer_key_value, layer_conv, layer_recurrent)`,
    which returns the layer's output and its new conv and recurrent states:
    `(B, ...)`, or with `steps` one per token, `(steps, B, ...)` (a
    full-attention layer's states, unchanged, are then repeated `steps`
    times). The returned cache stacks the layers: `(B, layers, ...)`, or
    `(steps, B, layers, ...)`.
    """
    key_value, conv, recurrent = cache
    x = backbone.token_embedding(token_ids)
    new_key_value, new_conv, new_recurrent = [], [], []
    for i, (layer, is_recurrent) in enumerate(
        zip(backbone.transformer_layers, _recurrent_layers(backbone))
    ):
        layer_kv, layer_conv, layer_rec = (
            key_value[:, i],
            conv[:, i],
            recurrent[:, i],
        )
        if not is_recurrent:
            x, layer_kv, _, _ = layer.call_and_update_cache(
                x, layer_kv, layer_conv, layer_rec, index
            )
            if steps is not None:
                layer_conv = ops.stack([layer_conv] * steps)
                layer_rec = ops.stack([layer_rec] * steps)
        else:
            x, layer_conv, layer_rec = run_recurrent(
                layer, x, layer_kv, layer_conv, layer_rec
            )
        new_key_value.append(layer_kv)
        new_conv.append(layer_conv)
        new_recurrent.append(layer_rec)
    hidden = backbones.final_norm(backbone)(x)
    axis = 1 if steps is None else 2  # the layers' axis
    cache = (
        ops.stack(new_key_value, axis=1),
        ops.stack(new_conv, axis=axis),
        ops.stack(new_recurrent, axis=axis),
    )
    return hidden, cache


def _recurrent_call_with_cache(task, token_ids, cache, index):
    """`task.call_with_cache` for a hybrid trunk (Qwen3.5), keeping every
    intermediate recurrent state.

    Full-attention layers run over the whole window against their key/value
    cache. Recurrent layers (Gated DeltaNet) run token by token, through
    keras-hub's own single-token step (what its `generate` runs), and their
    conv and recurrent states after each token are stacked: the returned
    cache is `(key_value, conv (W, ...), recurrent (W, ...))`, W the window
    length, for `_select`.
    """
    backbone = task.backbone
    width = token_ids.shape[1]

    def run_recurrent(layer, x, layer_kv, layer_conv, layer_rec):
        outputs, convs, recs = [], [], []
        for t in range(width):
            y, _, layer_conv, layer_rec = layer.call_and_update_cache(
                x[:, t : t + 1], layer_kv, layer_conv, layer_rec, index + t
            )
            outputs.append(y)
            convs.append(layer_conv)
            recs.append(layer_rec)
        return (
            ops.concatenate(outputs, axis=1),
            ops.stack(convs),
            ops.stack(recs),
        )

    hidden, cache = _hybrid_trunk(
        backbone, token_ids, cache, index, run_recurrent, steps=width
    )  # states (W, B, layers, ...)
    logits = backbone.token_embedding(hidden, reverse=True)
    return logits, hidden, cache


def _recurrent_prefill(task, token_ids, count):
    """Prefill of a hybrid trunk: `(hidden, cache)` with the outputs and
    recurrent states of the tokens `0 .. count - 1` exactly.

    Full-attention layers run over all of `token_ids` at once. Recurrent
    layers run token by token (a loop of keras-hub's single-token step) up
    to position `count`, where the first verification window starts; their
    outputs from there on are zeros. Nothing reads what those give: every
    window overwrites the key/value entries of its positions before any
    later position attends to them.
    """
    backbone = task.backbone
    batch, length = token_ids.shape
    cache = backbones.recurrent_cache(
        backbone, batch, length, task.compute_dtype
    )

    def run_recurrent(layer, x, layer_kv, layer_conv, layer_rec):
        dim = x.shape[-1]

        def step(t, carry):
            outputs, state_conv, state_rec = carry
            token = ops.slice(x, [0, t, 0], [batch, 1, dim])
            y, _, state_conv, state_rec = layer.call_and_update_cache(
                token, layer_kv, state_conv, state_rec, t
            )
            outputs = ops.slice_update(outputs, [0, t, 0], y)
            return outputs, state_conv, state_rec

        return ops.fori_loop(
            0, count, step, (ops.zeros_like(x), layer_conv, layer_rec)
        )

    return _hybrid_trunk(backbone, token_ids, cache, 0, run_recurrent)


# === Draft vocabulary ========================================================


def frequent_tokens(token_ids, size, vocabulary_size):
    """The `size` most frequent ids in `token_ids`, most frequent first
    (ties: the smaller id first), int32 `(size,)`: a draft vocabulary for
    `MTPCausalLM.set_draft_vocabulary` (FR-Spec, Zhao et al. 2025).

    Args:
        token_ids: an integer array of any shape, or an iterable of them
            (batches of a dataset's `token_ids`). Every id given is
            counted: leave padding out.
        size: int in `[1, vocabulary_size]`: how many ids to keep.
        vocabulary_size: int: every id must be in `[0, vocabulary_size)`.
    """
    vocabulary_size = _positive_int(vocabulary_size, "vocabulary_size")
    if (
        isinstance(size, bool)
        or not isinstance(size, (int, np.integer))
        or not 1 <= size <= vocabulary_size
    ):
        raise ValueError(
            "`size` must be an int in [1, vocabulary_size="
            f"{vocabulary_size}]. Received: size={size!r}"
        )
    if isinstance(token_ids, (np.ndarray, np.generic)) or hasattr(
        token_ids, "shape"
    ):
        token_ids = [token_ids]
    counts = np.zeros(vocabulary_size, "int64")
    for ids in token_ids:
        ids = np.asarray(ops.convert_to_numpy(ids)).ravel()
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"Token ids must be integers. Received dtype {ids.dtype}"
            )
        ids = ids.astype("int64")
        _check_ids_in_range(ids, vocabulary_size)
        counts += np.bincount(ids, minlength=vocabulary_size)
    # A stable sort of the negated counts keeps equal counts in id order.
    ranked = np.argsort(-counts, kind="stable")
    return ranked[:size].astype("int32")


def check_draft_vocabulary(token_ids, vocabulary_size):
    """`token_ids` as a draft vocabulary: None (the full vocabulary), or
    distinct ids in `[0, vocabulary_size)`, at least one, as int32 `(K,)`;
    a clear error otherwise."""
    if token_ids is None:
        return None
    ids = np.asarray(ops.convert_to_numpy(token_ids))
    if ids.ndim != 1 or not ids.size:
        raise ValueError(
            "A draft vocabulary is a non-empty 1-D list of token ids, or "
            f"None. Received: an array of shape {ids.shape}"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"Draft vocabulary ids must be integers. Received dtype {ids.dtype}"
        )
    _check_ids_in_range(ids, vocabulary_size)
    values, counts = np.unique(ids, return_counts=True)
    if counts.max() > 1:
        raise ValueError(
            "Draft vocabulary ids must be distinct. Received repeated ids "
            f"{values[counts > 1][:8].tolist()}"
        )
    return ids.astype("int32")


def _positive_int(value, name):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 1
    ):
        raise ValueError(
            f"`{name}` must be a positive int. Received: {value!r}"
        )
    return int(value)


def _check_ids_in_range(ids, vocabulary_size):
    bad = ids[(ids < 0) | (ids >= vocabulary_size)]
    if bad.size:
        raise ValueError(
            f"Token ids must be in [0, {vocabulary_size}). Received "
            f"{bad[:8].tolist()}"
        )


def spread(probs, slots):
    """A distribution over a draft vocabulary `(..., K)` as one over the
    full vocabulary `(..., V)`, zero outside: `slots` `(V,)` gives each
    id's column in the draft vocabulary, or K for ids outside it."""
    zero = ops.zeros_like(probs[..., :1])
    return ops.take(ops.concatenate([probs, zero], axis=-1), slots, axis=-1)


# === Sampling ================================================================


def sampler_probabilities(sampler, logits):
    """The distribution `sampler` draws the next token from, `(..., V)`
    float32: keras-hub's temperature softmax (`Sampler.compute_probabilities`)
    then, for `TopKSampler` and `TopPSampler`, their filtering, renormalized.

    `RandomSampler`, `TopKSampler` and `TopPSampler` (keras-hub 0.32) are
    supported: speculative sampling needs the distribution itself, not only
    a draw from it. Tokens tied with the last one kept by top-k / top-p are
    all kept (keras-hub keeps the first of them by index).
    """
    if type(sampler) not in SAMPLING:
        raise ValueError(
            "Speculative sampling computes the sampler's distribution, which "
            "keras_mtp knows for "
            + ", ".join(c.__name__ for c in SAMPLING)
            + f". Received: sampler={type(sampler).__name__}"
        )
    logits = ops.cast(logits, "float32")
    probs = ops.softmax(logits / sampler.temperature, axis=-1)
    vocabulary = probs.shape[-1]
    k = getattr(sampler, "k", None)
    if k is not None and k < vocabulary:
        kth = ops.top_k(probs, k, sorted=True)[0][..., -1:]
        probs = ops.where(probs >= kth, probs, 0.0)
    if isinstance(sampler, keras_hub.samplers.TopPSampler):
        # keras-hub keeps the most probable tokens while the probability
        # mass before each is <= p (always the first one).
        ranked = ops.top_k(probs, vocabulary, sorted=True)[0]
        before = ops.cumsum(ranked, axis=-1) - ranked
        kept = ops.sum(ops.cast(before <= sampler.p, "int32"), -1)
        last = ops.take_along_axis(ranked, kept[..., None] - 1, axis=-1)
        probs = ops.where(probs >= last, probs, 0.0)
    return probs / ops.sum(probs, axis=-1, keepdims=True)


SAMPLING = (
    keras_hub.samplers.RandomSampler,
    keras_hub.samplers.TopKSampler,
    keras_hub.samplers.TopPSampler,
)


def sample(probs, uniform):
    """Inverse-CDF draws from `probs` `(..., V)`, one per `uniform` value in
    `(0, 1)` `(...)`: int32 `(...)`. A zero-probability token is never
    drawn."""
    cdf = ops.cumsum(ops.convert_to_tensor(probs), axis=-1)
    threshold = ops.convert_to_tensor(uniform)[..., None] * cdf[..., -1:]
    token = ops.sum(ops.cast(cdf < threshold, "int32"), axis=-1)
    return ops.minimum(token, probs.shape[-1] - 1)


def residual(p, q):
    """Where a rejected draft resamples from: `norm(max(0, p - q))` (Leviathan
    et al. 2023), or `p` where that is all zeros (p == q up to rounding:
    then no draft is ever rejected)."""
    r = ops.maximum(p - q, 0.0)
    total = ops.sum(r, axis=-1, keepdims=True)
    return ops.where(total > 0, r / ops.maximum(total, 1e-30), p)


def accept_drafts(p, q, drafts, uniform):
    """Leviathan et al.'s test: a draft `x ~ q` is accepted with probability
    `min(1, p(x) / q(x))`; `p` and `q` `(B, D, V)`, `drafts` and `uniform`
    `(B, D)`. Returns a bool `(B, D)`."""
    index = drafts[..., None]
    p_x = ops.take_along_axis(p, index, axis=-1)[..., 0]
    q_x = ops.take_along_axis(q, index, axis=-1)[..., 0]
    return uniform * q_x < p_x


def _shift_right(x, bits):
    """Logical right shift of int32 bits."""
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def _mix(x):
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche), on
    int32 bits; products wrap around on every backend."""
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    x = x * -2048144789  # 0x85ebca6b
    x = ops.bitwise_xor(x, _shift_right(x, 13))
    x = x * -1028477387  # 0xc2b2ae35
    return ops.bitwise_xor(x, _shift_right(x, 16))


def uniform(seed, counter, shape):
    """Uniform float32 values in `(0, 1)`, 24 random bits each: a hash of
    `(seed, counter, index)`, int32 tensors. Counter-based, so the loop
    carries no random state: the same draws on every backend and inside
    JAX's `jit`, TensorFlow's `tf.function` or eager torch."""
    size = int(np.prod(shape))
    key = _mix(ops.bitwise_xor(_mix(seed), counter))
    index = ops.arange(1, size + 1, dtype="int32")
    bits = _shift_right(_mix(ops.bitwise_xor(key, _mix(index))), 8)
    values = (ops.cast(bits, "float32") + 0.5) * (1.0 / (1 << 24))
    return ops.reshape(values, shape)


# === The decoding loop =======================================================


class _State(typing.NamedTuple):
    """The decoding loop's state (tensors)."""

    n: typing.Any  # () position of the last accepted token
    buffer: typing.Any  # (B, T + 2D) accepted tokens, then drafts n+1 ..
    draft_probs: typing.Any  # (B, D + 1, V) q of the next window's drafts
    cache: typing.Any  # the main model's cache (keras-hub's)
    mtp_caches: typing.Any  # one key/value cache per depth
    stopped: typing.Any  # (B,) a row has generated a stop token
    forwards: typing.Any  # (B,) main forward passes while a row generated
    reached: typing.Any  # (D,) drafts checked (all earlier ones accepted)
    accepted: typing.Any  # (D,) drafts accepted
    steps: typing.Any  # () main forward passes (the prefill's included)


class _Inputs(typing.NamedTuple):
    """The loop's constants (tensors)."""

    prompt: typing.Any  # (B, T + 2D) the prompts, padded
    forced: typing.Any  # (B, T + 2D) prompt positions
    first: typing.Any  # () the shortest prompt's last position
    seed: typing.Any  # () int32


class _Loop:
    """Self-speculative decoding of `model` (see the module docstring): a
    prefill, then `verify` and `draft` until every row has stopped.

    Args:
        model: an `MTPCausalLM`.
        task: keras-hub's `CausalLM` on `model.backbone`.
        stop_token_ids: tuple of ints, or None.
        ragged: False promises that every prompt has the same length, so
            no generated position needs the prompt's token (fewer ops).
        depths: how many MTP depths draft; 0 decodes one token per main
            forward pass.
        sampler: a keras-hub `Sampler` whose distribution is known
            (`SAMPLING`), or None for greedy decoding.

    With a draft vocabulary of K ids, their rows of the output head's
    kernel are gathered once per call (`backbones.decoding_kernel`), and
    depth k scores only those K ids: greedy, its draft is the best of
    them; sampling, `q` is the sampler's distribution over them, zero
    elsewhere. The main model still verifies over the full vocabulary with
    the same rules, so the output does not change, only how often drafts
    are accepted.
    """

    def __init__(self, model, task, stop_token_ids, ragged, depths, sampler):
        self.task = task
        self.backbone = model.backbone
        self.embedding = model.backbone.token_embedding
        self.layers = model.mtp_block.mtp_layers[:depths] if depths else []
        self.scale = model.mtp_block.embedding_scale if depths else None
        self.depths = depths
        self.window = depths + 1
        self.stop_token_ids = stop_token_ids
        self.ragged = ragged
        self.sampler = sampler

    def __call__(self, token_ids, padding_mask, seed, draft_vocabulary=None):
        batch, self.length = token_ids.shape
        self.draft_ids = self.slots = None
        self.draft_head = backbones.decoding_kernel(self.embedding)
        if draft_vocabulary is not None and self.depths:
            ids = ops.cast(draft_vocabulary, "int32")
            size, vocabulary = ids.shape[0], self.embedding.input_dim
            self.draft_ids = ids
            self.draft_head = backbones.decoding_kernel(self.embedding, ids)
            # Each id's column in the draft vocabulary, or K outside it.
            self.slots = ops.scatter_update(
                ops.full((vocabulary,), size, "int32"),
                ids[:, None],
                ops.arange(size, dtype="int32"),
            )
        self.cache_length = _cache_length(
            self.backbone, self.length, self.depths
        )
        # Drafts and windows reach up to 2D positions past the last one.
        pad = [[0, 0], [0, 2 * self.depths]]
        inputs = _Inputs(
            prompt=ops.pad(ops.cast(token_ids, "int32"), pad),
            forced=ops.pad(ops.cast(padding_mask, "bool"), pad),
            first=ops.min(ops.sum(ops.cast(padding_mask, "int32"), 1)) - 1,
            seed=ops.cast(seed, "int32"),
        )
        state = self.draft(*self.prefill(inputs), inputs)

        def cond(state):
            more = state.n < self.length - 1
            return ops.logical_and(
                more, ops.logical_not(ops.all(state.stopped))
            )

        def body(state):
            return (self.draft(*self.verify(state, inputs), inputs),)

        (state,) = ops.while_loop(cond, body, (state,))
        return self.outputs(state, inputs, padding_mask)

    # === Steps ===

    def prefill(self, inputs):
        """The prompts through the main model (its token for `first + 1`)
        and every depth (the first drafts)."""
        batch = inputs.prompt.shape[0]
        first, length = inputs.first, self.cache_length
        hidden, cache = _prefill(
            self.task,
            inputs.prompt[:, :length],
            inputs.forced[:, :length],
            first + 1,
        )
        logits = self.embedding(ops.take(hidden, first, axis=1), reverse=True)
        token, _ = self.choose(logits, inputs, 1, batch)
        token = self.keep_prompt(first + 1, token[:, None], inputs)
        fresh = ops.logical_not(ops.take(inputs.forced, first + 1, axis=1))
        fresh = fresh & (first + 1 < self.length)
        # Each depth's cache is shaped like that of the layer its block copies.
        empty = keras.tree.map_structure(
            ops.zeros_like,
            backbones.layer_cache(
                self.backbone,
                cache,
                backbones.block_source_index(self.backbone),
            ),
        )
        zeros = ops.zeros((self.depths,), "int32")
        state = _State(
            n=first + 1,
            buffer=ops.slice_update(inputs.prompt, [0, first + 1], token),
            draft_probs=self.no_probs(batch),
            cache=cache,
            mtp_caches=tuple(empty for _ in self.layers),
            stopped=self.is_stop(token[:, 0]) & fresh,
            forwards=ops.ones((batch,), "int32")
            * ops.cast(first + 1 < self.length, "int32"),
            reached=zeros,
            accepted=zeros,
            steps=ops.ones((), "int32"),
        )
        return state, hidden, ops.zeros((), "int32")

    def verify(self, state, inputs):
        """The main model over `[x_n, d_1 .. d_D]`; accepts a prefix of the
        drafts and one token more. Returns `(state, hidden, start)`: the
        window's hidden states and first position, for `draft`."""
        batch, depths, window = state.buffer.shape[0], self.depths, self.window
        n = state.n
        # The window starts at n, or earlier if the caches end first
        # (learned positions): positions <= n are then known tokens.
        start = ops.minimum(n, self.cache_length - window)
        tokens = ops.slice(state.buffer, [0, start], [batch, window])
        prompt_positions = ops.slice(inputs.forced, [0, start], [batch, window])
        logits, hidden, cache = _verify(
            self.task,
            tokens,
            state.cache,
            start,
            ops.logical_not(prompt_positions),
        )
        # Offsets 1 .. D + 1 of the window: the positions start + 1 ..
        positions = start + 1 + ops.arange(window, dtype="int32")
        forced = ops.slice(inputs.forced, [0, start + 1], [batch, window])
        known = forced | (positions <= n)[None]  # (B, D + 1)
        current = ops.slice(state.buffer, [0, start + 1], [batch, window])
        run, new_tokens = self.accept(
            tokens,
            logits,
            known,
            current,
            state.draft_probs,
            inputs.seed,
            state.steps * (depths + 3),
        )
        # Rows advance together by the smallest accepted count. A row that
        # accepted more keeps its next accepted draft in place of the
        # correction (equally a draw from p) and drops the rest: they are
        # drafted and checked again from the new position.
        active = ops.logical_not(state.stopped)
        own = ops.sum(run, axis=1)
        advance = ops.min(ops.where(active, own, depths))
        new_n = start + advance + 1
        buffer = ops.slice_update(state.buffer, [0, start + 1], new_tokens)
        stops = self.is_stop(new_tokens) & ~forced
        stops = stops & (positions < self.length)[None]
        kept = (positions <= new_n)[None]
        reached, accepted = self.count(state, run, known, stops, start)
        state = state._replace(
            n=new_n,
            buffer=buffer,
            cache=_select(self.backbone, cache, new_n - 1 - start),
            stopped=state.stopped | ops.any(stops & kept, axis=1),
            forwards=state.forwards + ops.cast(active, "int32"),
            reached=state.reached + reached,
            accepted=state.accepted + accepted,
            steps=state.steps + 1,
        )
        return state, hidden, start

    def accept(self, tokens, logits, known, current, q, seed, counter):
        """The acceptance rule on the window `tokens` `(B, D + 1)` and the
        main `logits` over it. Returns `(run, new_tokens)`: int32 `(B, D)`,
        1 where a draft and all before it passed (`known` tokens pass), and
        the tokens of the offsets 1 .. D + 1 (`current` where `known`, the
        row's own token after its accepted drafts)."""
        batch, depths = tokens.shape[0], self.depths
        if self.sampler is None:
            # Greedy: a draft is accepted where it is the main argmax.
            targets = _argmax(logits)  # (B, D + 1)
            passed = known[:, :-1] | (tokens[:, 1:] == targets[:, :-1])
            run = ops.cumprod(ops.cast(passed, "int32"), axis=1)  # (B, D)
            return run, ops.where(known, current, targets)
        p = sampler_probabilities(self.sampler, logits)  # (B, D + 1, V)
        passed = accept_drafts(
            p[:, :-1],
            q[:, 1:],
            tokens[:, 1:],
            uniform(seed, counter, (batch, depths)),
        )
        run = ops.cumprod(ops.cast(known[:, :-1] | passed, "int32"), axis=1)
        # The token after a row's accepted drafts: from the residual where
        # its draft was rejected, from p after all D passed.
        own = ops.sum(run, axis=1)
        p_next = _take_rows(p, own)  # (B, V)
        q_next = _take_rows(
            ops.concatenate([q[:, 1:], ops.zeros_like(q[:, :1])], 1), own
        )
        correction = sample(
            residual(p_next, q_next), uniform(seed, counter + 1, (batch,))
        )
        offsets = ops.arange(self.window, dtype="int32")[None]
        own_token = (offsets == own[:, None]) & ops.logical_not(known)
        return run, ops.where(own_token, correction[:, None], current)

    def draft(self, state, hidden, start, inputs):
        """The MTP chain over the window's positions `start ..`, reading the
        window's hidden states; depth k's output at `n - 1` drafts
        `x_{n+k}` from the tokens `.. x_n, d_1 .. d_{k-1}`."""
        batch, width = hidden.shape[0], hidden.shape[1]
        n, buffer = state.n, state.buffer
        at = n - 1 - start
        next_start = ops.minimum(n, self.cache_length - self.window)
        draft_probs = self.no_probs(batch)
        counter = (state.steps - 1) * (self.depths + 3) + 2
        caches = []
        for k, layer in enumerate(self.layers, start=1):
            ids = ops.slice(buffer, [0, start + k], [batch, width])
            hidden, normed, cache = layer.call_with_cache(
                hidden,
                backbones.embed(self.embedding, ids, scale=self.scale),
                state.mtp_caches[k - 1],
                start,
            )
            caches.append(cache)
            token, q = self.propose(
                ops.take(normed, at, axis=1), inputs, counter + k, batch
            )
            token = self.keep_prompt(n + k, token[:, None], inputs)
            buffer = ops.slice_update(buffer, [0, n + k], token)
            if q is not None:
                # Stored at the draft's offset in the next window, if there.
                offset = n + k - next_start
                stored = ops.slice_update(
                    draft_probs,
                    [0, ops.minimum(offset, self.depths), 0],
                    q[:, None],
                )
                draft_probs = ops.where(
                    offset <= self.depths, stored, draft_probs
                )
        return state._replace(
            buffer=buffer, draft_probs=draft_probs, mtp_caches=tuple(caches)
        )

    def outputs(self, state, inputs, padding_mask):
        """keras-hub's outputs and the loop's counts."""
        length = self.length
        # Positions past the last accepted one keep the inputs, as in keras-hub.
        positions = ops.arange(length, dtype="int32")[None]
        token_ids = ops.where(
            (positions <= state.n) | inputs.forced[:, :length],
            state.buffer[:, :length],
            inputs.prompt[:, :length],
        )
        mask = output_padding_mask(token_ids, padding_mask, self.stop_token_ids)
        stats = {
            "forward_passes": state.steps,
            "row_forward_passes": state.forwards,
            "reached": state.reached,
            "accepted": state.accepted,
        }
        return token_ids, mask, stats

    # === Helpers ===

    def choose(self, logits, inputs, counter, batch):
        """The next token for `logits` `(B, V)`, and the distribution it
        was drawn from (None when greedy)."""
        if self.sampler is None:
            return _argmax(logits), None
        probs = sampler_probabilities(self.sampler, logits)
        draw = uniform(inputs.seed, counter, (batch,))
        return sample(probs, draw), probs

    def propose(self, normed, inputs, counter, batch):
        """A depth's draft from its normed hidden state `(B, d)` at the
        drafting position, and `q` over the full vocabulary (None when
        greedy): through the draft head, so over the draft vocabulary if
        there is one, its ids mapped back to the full vocabulary's."""
        logits = backbones.decoding_logits(
            self.embedding, normed, self.draft_head
        )
        if self.draft_ids is None:
            return self.choose(logits, inputs, counter, batch)
        if self.sampler is None:
            return ops.take(self.draft_ids, _argmax(logits)), None
        probs = sampler_probabilities(self.sampler, logits)  # (B, K)
        column = sample(probs, uniform(inputs.seed, counter, (batch,)))
        return ops.take(self.draft_ids, column), spread(probs, self.slots)

    def no_probs(self, batch):
        if self.sampler is None:
            return ops.zeros((1,), "float32")  # greedy: drafts are one-hot
        size = self.embedding.input_dim
        return ops.zeros((batch, self.window, size), "float32")

    def keep_prompt(self, start, tokens, inputs):
        """`tokens` for the positions `start ..`, or the prompt's there."""
        if not self.ragged:
            return tokens
        size = [tokens.shape[0], tokens.shape[1]]
        return ops.where(
            ops.slice(inputs.forced, [0, start], size),
            ops.slice(inputs.prompt, [0, start], size),
            tokens,
        )

    def is_stop(self, tokens):
        if not self.stop_token_ids:
            return ops.zeros_like(tokens, dtype="bool")
        return _is_stop(tokens, self.stop_token_ids)

    def count(self, state, run, known, stops, start):
        """Per depth: how many drafts were checked (every earlier token of
        the window accepted, none of them a stop token, the draft's position
        a generated one before `max_length`) and accepted, over the rows
        still generating."""
        depths = self.depths
        batch = run.shape[0]
        ones = ops.ones((batch, 1), "int32")
        run = ops.concatenate([ones, run], axis=1)  # offsets <= j accepted
        clear = ops.concatenate(
            [
                ones,
                1
                - ops.cast(
                    ops.cumsum(ops.cast(stops, "int32"), 1) > 0, "int32"
                ),
            ],
            axis=1,
        )  # no stop token at offsets <= j
        active = ops.cast(ops.logical_not(state.stopped), "int32")
        reached, accepted = [], []
        for k in range(1, depths + 1):
            offset = state.n - start + k  # depth k's draft, in the window
            inside = offset <= depths
            at = ops.minimum(offset, depths)
            draft = ops.logical_not(ops.take(known, at - 1, axis=1))
            valid = (
                active
                * ops.cast(
                    draft & inside & (state.n + k < self.length), "int32"
                )
                * ops.take(run, at - 1, axis=1)
                * ops.take(clear, at - 1, axis=1)
            )
            reached.append(ops.sum(valid))
            accepted.append(ops.sum(valid * ops.take(run, at, axis=1)))
        if not depths:
            return state.reached, state.accepted
        return ops.stack(reached), ops.stack(accepted)


def _take_rows(x, index):
    """`x[b, index[b]]` for `x` `(B, W, V)`: `(B, V)`."""
    index = ops.broadcast_to(index[:, None, None], (x.shape[0], 1, x.shape[2]))
    return ops.take_along_axis(x, index, axis=1)[:, 0]


def speculative_decode(
    model,
    task,
    token_ids,
    padding_mask,
    seed=0,
    stop_token_ids=None,
    ragged=True,
    depths=None,
    sampler=None,
    draft_vocabulary=None,
):
    """The decoding loop, in backend ops (traceable).

    Args:
        model: an `MTPCausalLM` with `mtp_num_layers >= 1`.
        task: keras-hub's `CausalLM` on `model.backbone`.
        token_ids, padding_mask: int tensors `(B, T)`; the mask marks the
            prompts, and `T` is the total length.
        seed: int32 scalar: the random draws of a stochastic `sampler`.
        stop_token_ids: tuple of ints, or None.
        ragged: False promises that every prompt has the same length, so
            no generated position needs the prompt's token (fewer ops).
        depths: how many MTP depths draft (default: all); 0 decodes one
            token per main forward pass.
        sampler: None (greedy), or a keras-hub sampler of `SAMPLING`.
        draft_vocabulary: None, or int32 `(K,)`: the ids the depths draft
            from (`MTPCausalLM.set_draft_vocabulary`).

    Returns:
        `(token_ids, padding_mask, stats)`: the outputs, as keras-hub's
        `generate` gives them, and a dict of int tensors: `forward_passes`
        (main model passes, the prefill's included), `row_forward_passes`
        `(B,)` (those while each row generated), `reached` and `accepted`
        `(D,)`: per depth, how often its draft was checked (all earlier
        tokens accepted) and accepted, up to each row's stop token.
    """
    if depths is None:
        depths = model.mtp_num_layers
    loop = _Loop(model, task, stop_token_ids, ragged, depths, sampler)
    return loop(token_ids, padding_mask, seed, draft_vocabulary)


class _Decoders:
    """keras-hub's task and the compiled decoding functions of one model
    (a plain object, so Keras tracks neither as part of the model)."""

    def __init__(self, model):
        self.task = backbones.causal_lm(model.backbone)
        self.task.compile(sampler="greedy")
        self.functions = {}

    def speculative(self, model, stop_token_ids, ragged, depths, sampler):
        # The loop reads only these of a sampler (not its seed).
        settings = None
        if sampler is not None:
            settings = tuple(
                (name, getattr(sampler, name, None))
                for name in ("temperature", "k", "p")
            )
            settings = (type(sampler).__name__,) + settings
        key = (stop_token_ids, ragged, depths, settings)
        if key not in self.functions:

            def decode(token_ids, padding_mask, seed, draft_vocabulary=None):
                return speculative_decode(
                    model,
                    self.task,
                    token_ids,
                    padding_mask,
                    seed,
                    stop_token_ids=stop_token_ids,
                    ragged=ragged,
                    depths=depths,
                    sampler=sampler,
                    draft_vocabulary=draft_vocabulary,
                )

            # Traced again for a draft vocabulary, or one of another size.
            self.functions[key] = _compile(decode, model)
        return self.functions[key]

    def keras_hub(self, sampler, seed):
        """The task compiled with `sampler`, its random state reset to
        `seed` if given. A sampler of the same class and settings as the
        task's keeps keras-hub's compiled generate function."""

        def settings(s):
            return type(s), {
                k: v for k, v in s.get_config().items() if k != "seed"
            }

        if settings(sampler) != settings(self.task.sampler):
            self.task.compile(sampler=sampler)
        generator = getattr(self.task.sampler, "seed_generator", None)
        if seed is not None and generator is not None:
            fresh = keras.random.SeedGenerator(seed)
            generator.state.assign(fresh.state.value)
        return self.task


def keras_hub_generate(task, inputs, stop_token_ids=None):
    """keras-hub's own generation of `task` (its `generate_step`, compiled
    as keras-hub compiles it) on `inputs`, a dict of `token_ids` and
    `padding_mask` padded to the total length: its `token_ids` and
    `padding_mask` outputs. Unlike `task.generate` without a preprocessor,
    this also works for `Gemma3CausalLM`, whose outputs carry `images=None`
    that `generate` fails to batch."""
    if stop_token_ids is not None:
        stop_token_ids = tuple(stop_token_ids)
    inputs = {
        key: ops.convert_to_tensor(inputs[key])
        for key in ("token_ids", "padding_mask")
    }
    outputs = task.make_generate_function()(inputs, stop_token_ids)
    return {key: outputs[key] for key in ("token_ids", "padding_mask")}


def _compile(fn, model):
    """`fn(*tensors)` compiled for the backend: `jax.jit` with
    the weights as arguments (not baked in as constants), `tf.function`,
    or eager under `torch.no_grad`."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        variables = model.trainable_variables + model.non_trainable_variables

        @jax.jit
        def jitted(values, *args):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                return fn(*args)

        return lambda *args: jitted([v.value for v in variables], *args)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if backend == "torch":
        import torch

        def no_grad(*args):
            with torch.no_grad():
                return fn(*args)

        return no_grad
    return fn


def get_sampler(sampler):
    """A keras-hub `Sampler` from a name, config or instance (keras-hub's
    `CausalLM.compile` rules); None and "greedy" give `GreedySampler`."""
    if sampler is None:
        sampler = "greedy"
    sampler = keras_hub.samplers.get(sampler)
    if not isinstance(sampler, keras_hub.samplers.Sampler):
        raise ValueError(
            '`sampler` must be a name ("greedy", "top_k", "top_p", '
            '"random") or a `keras_hub.samplers.Sampler`. Received: '
            f"sampler={sampler!r}"
        )
    return sampler


def generate(
    model,
    inputs,
    max_length,
    stop_token_ids,
    speculative,
    sampler=None,
    seed=None,
):
    """`MTPCausalLM.generate`: returns `(outputs, stats)`."""
    speculative, sampler, stop_token_ids = _generate_arguments(
        model, speculative, sampler, seed, stop_token_ids
    )
    token_ids, prompt_mask = normalize_inputs(inputs, max_length)
    if not len(token_ids):  # no prompts: no forward pass, no outputs
        depths = model.mtp_num_layers if speculative else 0
        counts = {
            "forward_passes": 0,
            "row_forward_passes": 0,
            "reached": [0] * depths,
            "accepted": [0] * depths,
        }
        stats = _generate_stats(prompt_mask, prompt_mask, counts)
        mask = prompt_mask.astype(bool)
        return {"token_ids": token_ids, "padding_mask": mask}, stats
    decoders = _decoders(model)
    # keras-hub's `generate` where it is this model's decoding, else our
    # loop with no drafts (see `Family.keras_hub_generate`).
    exact = backbones.family(model.backbone).keras_hub_generate is None
    if speculative or not exact:
        outputs, mask, counts = _generate_with_loop(
            model,
            decoders,
            token_ids,
            prompt_mask,
            stop_token_ids,
            speculative,
            sampler,
            seed,
            exact=exact,
        )
    else:
        outputs, mask = _generate_with_keras_hub(
            decoders, token_ids, prompt_mask, stop_token_ids, sampler, seed
        )
        counts = None
    outputs = np.asarray(ops.convert_to_numpy(outputs)).astype("int32")
    mask = np.asarray(ops.convert_to_numpy(mask)).astype(bool)
    stats = _generate_stats(prompt_mask, mask, counts)
    return {"token_ids": outputs, "padding_mask": mask}, stats


def _generate_arguments(model, speculative, sampler, seed, stop_token_ids):
    """`generate`'s arguments checked: `(speculative, sampler,
    stop_token_ids)`, with `"auto"` resolved, a keras-hub `Sampler` and a
    tuple of ints (or None)."""
    if speculative == "auto":
        speculative = model.mtp_num_layers > 0
    if speculative and model.mtp_num_layers == 0:
        raise ValueError(
            "Speculative decoding drafts with the MTP heads, and this model "
            "has mtp_num_layers=0. Received: speculative=True"
        )
    if seed is not None and not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int or None. Received: {seed!r}")
    sampler = get_sampler(sampler)
    if stop_token_ids is not None:
        stop_token_ids = tuple(int(i) for i in stop_token_ids)
    return speculative, sampler, stop_token_ids


def _decoders(model):
    """The model's `_Decoders`, made on first use (kept in `__dict__`, out
    of Keras' tracking)."""
    decoders = model.__dict__.get("_decoders")
    if decoders is None:
        decoders = _Decoders(model)
        model.__dict__["_decoders"] = decoders
    return decoders


def _generate_with_loop(
    model,
    decoders,
    token_ids,
    prompt_mask,
    stop_token_ids,
    speculative,
    sampler,
    seed,
    exact,
):
    """Decoding with our loop (`_Loop`), drafting if `speculative`:
    `(token_ids, padding_mask, counts)`, `counts` the loop's
    `forward_passes`, `row_forward_passes` (summed over rows), `reached`
    and `accepted` as Python ints. `exact`: whether keras-hub's generate
    would have been this model's decoding (for the error message)."""
    greedy = isinstance(sampler, keras_hub.samplers.GreedySampler)
    if not greedy and type(sampler) not in SAMPLING:
        raise ValueError(
            "keras_mtp's decoding loop samples with "
            + ", ".join(c.__name__ for c in SAMPLING)
            + " or greedy"
            + ("" if exact else " (keras-hub's generate is not exact here)")
            + f". Received: sampler={type(sampler).__name__}"
        )
    if seed is None:
        seed = 0
        if not greedy:
            seed = keras.random.randint(
                (), 0, 2**31 - 1, seed=sampler.seed_generator
            )
            seed = int(ops.convert_to_numpy(seed))
    lengths = prompt_mask.sum(axis=1)
    ragged = bool(lengths.max() > lengths.min())
    function = decoders.speculative(
        model,
        stop_token_ids,
        ragged,
        None if speculative else 0,
        None if greedy else sampler,
    )
    arguments = [token_ids, prompt_mask, np.asarray(seed % 2**31, "int32")]
    if speculative and model.draft_vocabulary is not None:
        # An argument, not a constant: a new vocabulary of the same size
        # reuses the compiled function.
        arguments.append(model.draft_vocabulary)
    outputs, mask, raw = function(*arguments)
    raw = {k: np.asarray(ops.convert_to_numpy(v)) for k, v in raw.items()}
    counts = {
        "forward_passes": int(raw["forward_passes"]),
        "row_forward_passes": int(raw["row_forward_passes"].sum()),
        "reached": raw["reached"].astype(int).tolist(),
        "accepted": raw["accepted"].astype(int).tolist(),
    }
    return outputs, mask, counts


def _generate_with_keras_hub(
    decoders, token_ids, prompt_mask, stop_token_ids, sampler, seed
):
    """Decoding with keras-hub's generate: `(token_ids, padding_mask)`."""
    task = decoders.keras_hub(sampler, seed)
    result = keras_hub_generate(
        task,
        {"token_ids": token_ids, "padding_mask": prompt_mask},
        stop_token_ids,
    )
    return result["token_ids"], result["padding_mask"]


def _generate_stats(prompt_mask, mask, counts):
    """`generate`'s stats from the prompt and output masks (NumPy) and our
    loop's `counts` (see `_generate_with_loop`), or None after keras-hub's
    generate, which makes one main forward pass per position."""
    lengths = prompt_mask.sum(axis=1)
    first = int(lengths.min()) - 1 if lengths.size else 0
    # Positions filled after the shortest prompt, up to each row's stop.
    positions = int((mask.sum(axis=1) - 1 - first).sum())
    if counts is None:
        # One position per main forward pass in each row still generating.
        counts = {
            "forward_passes": int((mask.sum(axis=1) - 1).max()) - first,
            "row_forward_passes": positions,
            "reached": [],
            "accepted": [],
        }
    reached, accepted = counts["reached"], counts["accepted"]
    return {
        "forward_passes": counts["forward_passes"],
        "new_tokens": int((mask & ~prompt_mask.astype(bool)).sum()),
        "tokens_per_forward": positions / max(counts["row_forward_passes"], 1),
        "acceptance": [a / max(r, 1) for a, r in zip(accepted, reached)],
        "reached": reached,
        "accepted": accepted,
    }
