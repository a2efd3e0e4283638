"""Greedy self-speculative decoding with the MTP heads.

The MTP depths, trained to predict the tokens 2, 3, ... ahead, draft `D`
tokens; the main model checks them all in one incremental forward pass over
its key/value cache and keeps the longest prefix that equals its own greedy
choices, plus one token of its own. The output is the main model's greedy
decoding, token for token; only the number of main forward passes changes.

One step, with `x_0 .. x_n` accepted and drafts `d_1 .. d_D` for the
positions `n+1 .. n+D`:

1. The main model runs over the window `[x_n, d_1, .., d_D]` at positions
   `n .. n+D` (keras-hub's `call_with_cache`), giving its greedy tokens
   `g_0 .. g_D` for the positions `n+1 .. n+D+1`.
2. `a` = the number of leading drafts with `d_j == g_{j-1}`; the tokens
   `g_0 .. g_a` are accepted, so `n' = n + a + 1`.
3. Depth `k` runs over the same window positions with its own cache: at
   position `i` it reads `h^{k-1}_i` and the token `x_{i+k}` (accepted, or
   the draft of an earlier depth), and its output at `n' - 1` drafts
   `x_{n'+k}`.

Window positions past `n'` are written to the caches too, but the next
window starts at `n'` and overwrites them, so every cached position below
the window holds accepted tokens only (the MTP caches hold what each depth
saw when the position was last in a window). Shapes are static, so the
loop compiles (JAX `jit`, TensorFlow `tf.function`).

In a batch, all rows advance together by the smallest `a` among the rows
that have not stopped. Rows whose prompt is longer than the shortest one
keep their prompt tokens, as keras-hub's samplers do.
"""

import functools

import keras
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
    if lengths.min() < 1:
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


def _check_positions(backbone, cache_length):
    limit = getattr(backbone, "max_sequence_length", None)
    if hasattr(backbone, "position_embedding") and limit is not None:
        if cache_length > limit:
            raise ValueError(
                "Speculative decoding looks up to mtp_num_layers positions "
                "past `max_length`, beyond this backbone's learned position "
                f"embeddings: max_length + mtp_num_layers = {cache_length} > "
                f"max_sequence_length = {limit}. Use a smaller max_length."
            )


def speculative_decode(
    model, task, token_ids, padding_mask, stop_token_ids, ragged=True
):
    """The decoding loop, in backend ops (traceable).

    Args:
        model: an `MTPCausalLM` with `mtp_num_layers >= 1`.
        task: keras-hub's `CausalLM` on `model.backbone`.
        token_ids, padding_mask: int tensors `(B, T)`; the mask marks the
            prompts, and `T` is the total length.
        stop_token_ids: tuple of ints, or None.
        ragged: False promises that every prompt has the same length, so
            no generated position needs the prompt's token (fewer ops).

    Returns:
        `(token_ids, padding_mask, stats)`: the outputs, as keras-hub's
        `generate` gives them, and a dict of int tensors: `forward_passes`
        (main model steps after the prompt), `positions` (positions filled),
        `reached` and `accepted` `(D,)`: per depth, how often its draft was
        checked (all earlier drafts accepted) and accepted, over the rows
        still generating.
    """
    depths = model.mtp_num_layers
    window = depths + 1
    batch, length = token_ids.shape
    embedding = model.backbone.token_embedding
    layers = model.mtp_block.mtp_layers
    scale = model.mtp_block.embedding_scale
    cache_length = length + depths
    _check_positions(model.backbone, cache_length)

    # Drafts and windows reach up to 2D positions past the last one.
    pad = [[0, 0], [0, 2 * depths]]
    prompt = ops.pad(ops.cast(token_ids, "int32"), pad)
    forced = ops.pad(ops.cast(padding_mask, "bool"), pad)
    first = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=1)) - 1

    def embed(ids):
        return backbones.embed(embedding, ids, scale=scale)

    def keep_prompt(start, tokens):
        """`tokens` for the positions `start ..`, or the prompt's there."""
        if not ragged:
            return tokens
        size = [batch, tokens.shape[1]]
        return ops.where(
            ops.slice(forced, [0, start], size),
            ops.slice(prompt, [0, start], size),
            tokens,
        )

    def run_depth(layer, hidden, ids, cache, index, at, position, buffer):
        """Depth `layer` over `ids` at positions `index ..`; its output at
        offset `at` drafts the token at `position`, written to `buffer`."""
        hidden, normed, cache = layer.call_with_cache(
            hidden, embed(ids), cache, index
        )
        draft = _argmax(embedding(ops.take(normed, at, axis=1), reverse=True))
        draft = keep_prompt(position, draft[:, None])
        return hidden, cache, ops.slice_update(buffer, [0, position], draft)

    # Prefill: the prompt through the main model and every depth at once.
    hidden, cache = task._build_cache(prompt[:, :cache_length])
    buffer = prompt
    mtp_caches = []
    last = ops.maximum(first - 1, 0)  # depth k there drafts x_{first + k}
    for k, layer in enumerate(layers, start=1):
        hidden, layer_cache, buffer = run_depth(
            layer,
            hidden,
            prompt[:, k : k + cache_length],
            ops.zeros_like(cache[:, 0]),
            0,
            last,
            first + k,
            buffer,
        )
        mtp_caches.append(layer_cache)

    zeros = ops.zeros((depths,), "int32")
    state = (
        first,
        buffer,
        cache,
        tuple(mtp_caches),
        ops.zeros((batch,), "bool"),  # stopped
        ops.zeros((), "int32"),  # forward passes
        zeros,  # reached, per depth
        zeros,  # accepted, per depth
    )

    def cond(n, buffer, cache, mtp_caches, stopped, *stats):
        return ops.logical_and(
            n < length - 1, ops.logical_not(ops.all(stopped))
        )

    def body(n, buffer, cache, mtp_caches, stopped, steps, reached, accepted):
        # 1. Verify: the main model over [x_n, d_1 .. d_D].
        tokens = ops.slice(buffer, [0, n], [batch, window])
        logits, hidden, cache = task.call_with_cache(tokens, cache, n)
        targets = keep_prompt(n + 1, _argmax(logits))  # (B, D + 1)
        # 2. Accept the drafts that match, and one token more.
        matches = ops.cast(tokens[:, 1:] == targets[:, :-1], "int32")
        run = ops.cumprod(matches, axis=1)  # (B, D): all drafts <= j match
        active = ops.logical_not(stopped)
        accept = ops.min(ops.where(active, ops.sum(run, axis=1), depths))
        weight = ops.cast(active, "int32")[:, None]
        checked = ops.concatenate([ops.ones_like(run[:, :1]), run[:, :-1]], 1)
        reached = reached + ops.sum(checked * weight, axis=0)
        accepted = accepted + ops.sum(run * weight, axis=0)
        buffer = ops.slice_update(buffer, [0, n + 1], targets)
        new_n = n + accept + 1
        if stop_token_ids:
            offsets = ops.arange(window, dtype="int32")
            fresh = (offsets <= accept) & (n + 1 + offsets < length)
            fresh = fresh[None] & ops.logical_not(
                ops.slice(forced, [0, n + 1], [batch, window])
            )  # new tokens, not the prompt's
            hit = ops.any(_is_stop(targets, stop_token_ids) & fresh, axis=1)
            stopped = ops.logical_or(stopped, hit)
        # 3. Draft: the MTP chain over the same window positions.
        new_caches = []
        for k, layer in enumerate(layers, start=1):
            hidden, layer_cache, buffer = run_depth(
                layer,
                hidden,
                ops.slice(buffer, [0, n + k], [batch, window]),
                mtp_caches[k - 1],
                n,
                accept,  # window offset of position n' - 1
                new_n + k,
                buffer,
            )
            new_caches.append(layer_cache)
        return (
            new_n,
            buffer,
            cache,
            tuple(new_caches),
            stopped,
            steps + 1,
            reached,
            accepted,
        )

    n, buffer, _, _, _, steps, reached, accepted = ops.while_loop(
        cond, body, state
    )
    # Positions past the last accepted one keep the inputs, as in keras-hub.
    positions = ops.arange(length, dtype="int32")[None]
    token_ids = ops.where(
        (positions <= n) | forced[:, :length],
        buffer[:, :length],
        prompt[:, :length],
    )
    mask = output_padding_mask(token_ids, padding_mask, stop_token_ids)
    stats = {
        "forward_passes": steps,
        "positions": ops.minimum(n, length - 1) - first,
        "reached": reached,
        "accepted": accepted,
    }
    return token_ids, mask, stats


class _Decoders:
    """keras-hub's task and the compiled decoding functions of one model
    (a plain object, so Keras tracks neither as part of the model)."""

    def __init__(self, model):
        self.task = backbones.causal_lm(model.backbone)
        self.task.compile(sampler="greedy")
        self.functions = {}

    def speculative(self, model, stop_token_ids, ragged):
        key = (stop_token_ids, ragged)
        if key not in self.functions:
            self.functions[key] = _compile(
                functools.partial(
                    speculative_decode,
                    model,
                    self.task,
                    stop_token_ids=stop_token_ids,
                    ragged=ragged,
                ),
                model,
            )
        return self.functions[key]


def _compile(fn, model):
    """`fn(token_ids, padding_mask)` compiled for the backend: `jax.jit` with
    the weights as arguments (not baked in as constants), `tf.function`,
    or eager under `torch.no_grad`."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        variables = model.trainable_variables + model.non_trainable_variables

        @jax.jit
        def jitted(values, token_ids, padding_mask):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                return fn(token_ids, padding_mask)

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


def generate(model, inputs, max_length, stop_token_ids, speculative):
    """`MTPCausalLM.generate`: returns `(outputs, stats)`."""
    if speculative == "auto":
        speculative = model.mtp_num_layers > 0
    if speculative and model.mtp_num_layers == 0:
        raise ValueError(
            "Speculative decoding drafts with the MTP heads, and this model "
            "has mtp_num_layers=0. Received: speculative=True"
        )
    if stop_token_ids is not None:
        stop_token_ids = tuple(int(i) for i in stop_token_ids)
    token_ids, prompt_mask = normalize_inputs(inputs, max_length)
    decoders = model.__dict__.get("_decoders")
    if decoders is None:
        decoders = _Decoders(model)
        model.__dict__["_decoders"] = decoders
    lengths = prompt_mask.sum(axis=1)
    first = int(lengths.min()) - 1
    if speculative:
        ragged = bool(lengths.max() > lengths.min())
        function = decoders.speculative(model, stop_token_ids, ragged)
        outputs, mask, raw = function(token_ids, prompt_mask)
        raw = {k: ops.convert_to_numpy(v) for k, v in raw.items()}
        forward_passes = int(raw["forward_passes"])
        positions = int(raw["positions"])
        reached = np.maximum(raw["reached"], 1)
        acceptance = (raw["accepted"] / reached).tolist()
    else:
        result = decoders.task.generate(
            {"token_ids": token_ids, "padding_mask": prompt_mask},
            stop_token_ids=stop_token_ids,
        )
        outputs, mask = result["token_ids"], result["padding_mask"]
        last = np.asarray(ops.convert_to_numpy(mask)).sum(axis=1).max() - 1
        positions = forward_passes = int(last) - first
        acceptance = []
    outputs = np.asarray(ops.convert_to_numpy(outputs)).astype("int32")
    mask = np.asarray(ops.convert_to_numpy(mask)).astype(bool)
    stats = {
        "forward_passes": forward_passes,
        "new_tokens": int((mask & ~prompt_mask.astype(bool)).sum()),
        "tokens_per_forward": positions / max(forward_passes, 1),
        "acceptance": acceptance,
    }
    return {"token_ids": outputs, "padding_mask": mask}, stats
