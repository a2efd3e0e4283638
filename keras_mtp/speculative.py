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
  state after offset `a`. The prefill runs them token by token too, with
  the state frozen from the first window's position on. keras-hub's own
  Qwen3.5 `generate` is not the model's greedy decoding (see
  `Family.keras_hub_generate`); `generate(speculative=False)` then runs this
  loop without drafts.
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
    if backbones.family(backbone).learned_positions and limit is not None:
        if cache_length > limit:
            raise ValueError(
                "Speculative decoding looks up to mtp_num_layers positions "
                "past `max_length`, beyond this backbone's learned position "
                f"embeddings: max_length + mtp_num_layers = {cache_length} > "
                f"max_sequence_length = {limit}. Use a smaller max_length."
            )


def _prefill(task, token_ids, prompt_mask, first):
    """`(hidden, cache)` of the main model over `token_ids`: keras-hub's
    prefill, or `_recurrent_prefill` for families with recurrent layers."""
    if backbones.family(task.backbone).recurrent:
        return _recurrent_prefill(task, token_ids, first)
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
    key_value, conv, recurrent = cache
    width = token_ids.shape[1]
    x = backbone.token_embedding(token_ids)
    new_key_value, conv_steps, recurrent_steps = [], [], []
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
            convs, recs = [layer_conv] * width, [layer_rec] * width
        else:
            outputs, convs, recs = [], [], []
            for t in range(width):
                y, _, layer_conv, layer_rec = layer.call_and_update_cache(
                    x[:, t : t + 1], layer_kv, layer_conv, layer_rec, index + t
                )
                outputs.append(y)
                convs.append(layer_conv)
                recs.append(layer_rec)
            x = ops.concatenate(outputs, axis=1)
        new_key_value.append(layer_kv)
        conv_steps.append(ops.stack(convs))
        recurrent_steps.append(ops.stack(recs))
    hidden = backbones.final_norm(backbone)(x)
    logits = backbone.token_embedding(hidden, reverse=True)
    cache = (
        ops.stack(new_key_value, axis=1),
        ops.stack(conv_steps, axis=2),  # (W, B, layers, ...)
        ops.stack(recurrent_steps, axis=2),
    )
    return logits, hidden, cache


def _recurrent_prefill(task, token_ids, first):
    """Prefill of a hybrid trunk: `(hidden, cache)` with the recurrent
    states after the tokens `0 .. first - 1` exactly.

    Full-attention layers run over all of `token_ids` at once. Recurrent
    layers run token by token over all positions (a loop of keras-hub's
    single-token step), their states frozen from position `first` on, where
    the first verification window starts. Outputs past `first` are never
    read: the windows overwrite those key/value entries first.
    """
    backbone = task.backbone
    batch, length = token_ids.shape
    key_value, conv, recurrent = backbones.recurrent_cache(
        backbone, batch, length, task.compute_dtype
    )
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
                x, layer_kv, layer_conv, layer_rec, 0
            )
        else:
            inputs = x
            width = inputs.shape[-1]

            def step(t, carry, layer=layer, inputs=inputs, layer_kv=layer_kv):
                outputs, state_conv, state_rec = carry
                token = ops.slice(inputs, [0, t, 0], [batch, 1, width])
                y, _, next_conv, next_rec = layer.call_and_update_cache(
                    token, layer_kv, state_conv, state_rec, t
                )
                keep = t < first
                return (
                    ops.slice_update(outputs, [0, t, 0], y),
                    ops.where(keep, next_conv, state_conv),
                    ops.where(keep, next_rec, state_rec),
                )

            x, layer_conv, layer_rec = ops.fori_loop(
                0, length, step, (ops.zeros_like(inputs), layer_conv, layer_rec)
            )
        new_key_value.append(layer_kv)
        new_conv.append(layer_conv)
        new_recurrent.append(layer_rec)
    hidden = backbones.final_norm(backbone)(x)
    cache = (
        ops.stack(new_key_value, axis=1),
        ops.stack(new_conv, axis=1),
        ops.stack(new_recurrent, axis=1),
    )
    return hidden, cache


def speculative_decode(
    model,
    task,
    token_ids,
    padding_mask,
    stop_token_ids,
    ragged=True,
    depths=None,
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
        depths: how many MTP depths draft (default: all); 0 decodes one
            token per main forward pass (plain greedy decoding).

    Returns:
        `(token_ids, padding_mask, stats)`: the outputs, as keras-hub's
        `generate` gives them, and a dict of int tensors: `forward_passes`
        (main model steps after the prompt), `positions` (positions filled),
        `reached` and `accepted` `(D,)`: per depth, how often its draft was
        checked (all earlier drafts accepted) and accepted, over the rows
        still generating.
    """
    if depths is None:
        depths = model.mtp_num_layers
    window = depths + 1
    batch, length = token_ids.shape
    backbone = model.backbone
    embedding = backbone.token_embedding
    layers = model.mtp_block.mtp_layers[:depths] if depths else []
    scale = model.mtp_block.embedding_scale if depths else None
    cache_length = length + depths
    _check_positions(backbone, cache_length)

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
    hidden, cache = _prefill(
        task, prompt[:, :cache_length], forced[:, :cache_length], first
    )
    # Each depth's cache is shaped like that of the layer its block copies.
    empty = keras.tree.map_structure(
        ops.zeros_like,
        backbones.layer_cache(
            backbone, cache, backbones.block_source_index(backbone)
        ),
    )
    buffer = prompt
    mtp_caches = []
    last = ops.maximum(first - 1, 0)  # depth k there drafts x_{first + k}
    for k, layer in enumerate(layers, start=1):
        hidden, layer_cache, buffer = run_depth(
            layer,
            hidden,
            prompt[:, k : k + cache_length],
            empty,
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
        prompt_positions = ops.slice(forced, [0, n], [batch, window])
        logits, hidden, cache = _verify(
            task, tokens, cache, n, ops.logical_not(prompt_positions)
        )
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
        cache = _select(backbone, cache, accept)
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

    def speculative(self, model, stop_token_ids, ragged, depths=None):
        key = (stop_token_ids, ragged, depths)
        if key not in self.functions:
            self.functions[key] = _compile(
                functools.partial(
                    speculative_decode,
                    model,
                    self.task,
                    stop_token_ids=stop_token_ids,
                    ragged=ragged,
                    depths=depths,
                ),
                model,
            )
        return self.functions[key]


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
    # keras-hub's `generate` where it is this model's greedy decoding, else
    # our loop with no drafts (see `Family.keras_hub_generate`).
    exact = backbones.family(model.backbone).keras_hub_generate is None
    if speculative or not exact:
        ragged = bool(lengths.max() > lengths.min())
        function = decoders.speculative(
            model, stop_token_ids, ragged, None if speculative else 0
        )
        outputs, mask, raw = function(token_ids, prompt_mask)
        raw = {k: ops.convert_to_numpy(v) for k, v in raw.items()}
        forward_passes = int(raw["forward_passes"])
        positions = int(raw["positions"])
        reached = np.maximum(raw["reached"], 1)
        acceptance = (raw["accepted"] / reached).tolist()
    else:
        result = keras_hub_generate(
            decoders.task,
            {"token_ids": token_ids, "padding_mask": prompt_mask},
            stop_token_ids,
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
