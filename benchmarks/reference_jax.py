"""GPT-2 + DeepSeek-V3 Multi-Token Prediction in plain JAX and optax.

The same model and objective as

    keras_mtp.MTPCausalLM(
        keras_hub.models.GPT2Backbone(..., dropout=0.0),
        mtp_num_layers=D, mtp_loss_scaling_factor=λ)

compiled with its default loss, with no Keras: a params pytree, pure functions
and a jitted optax train step. It is the yardstick for the Keras model (same
numbers, see tests/test_reference_jax.py) and for its speed (bench_train.py).

    loss   = main + λ · (1 / D) Σ_k L_k
    main   = Σ w · CE(z⁰, y) / (B · T)           # Keras' sum_over_batch_size
    L_k    = Σ w^k · CE(z^k, x[i+k+1]) / max(Σ w^k, 1)
    h⁰     = GPT2(x)                              # after its final LayerNorm
    h^k    = Block_k(W_k · [RMSNorm_e(Emb(x[i+k])); RMSNorm_h(h^{k-1})])
    z^k    = LayerNorm_k(h^k) · Embᵀ              # the tied head

Usage (the file is not a package; import it from benchmarks/):

    config = Config(vocabulary_size=64, num_layers=2, num_heads=2,
                    hidden_dim=32, intermediate_dim=64,
                    max_sequence_length=16, mtp_num_layers=2,
                    mtp_loss_scaling_factor=0.3)
    params = init_params(jax.random.key(0), config)   # or params_from_keras
    batch = make_batch(x, y, sample_weight)           # Keras' (x, y, w)
    optimizer = optax.adam(1e-3, eps=1e-7)
    opt_state = optimizer.init(params)
    train_step = make_train_step(config, optimizer)
    params, opt_state, metrics = train_step(params, opt_state, batch)

Matches keras-hub 0.32 / Keras 3.15 on JAX: attention scale 1/√(d/H), masked
scores set to -0.7 · float32 max before the softmax (jax.nn's convention, so a
fully masked row is uniform, never NaN), padding mask on the keys only,
LayerNorm ε 1e-5, the MTP RMSNorms' ε 1e-6 (GPT2Backbone has no
`layer_norm_epsilon`, so keras_mtp falls back to 1e-6), tanh-approximate GELU.

Adam: Keras adds ε to √v ("ε-hat"), optax to √v̂ = √(v / (1 - β₂ᵗ)). Both
give the same update when ε_optax = ε_keras / √(1 - β₂ᵗ); `keras_adam_eps`
returns that value for one step t (exact for a one-step comparison; over a run
the two differ only while √v is near ε).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Masked attention scores; what jax.nn.dot_product_attention (used by Keras'
# MultiHeadAttention on JAX) writes, rather than -inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the model; hashable, so jit treats it as static."""

    vocabulary_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    intermediate_dim: int
    max_sequence_length: int
    mtp_num_layers: int = 1
    mtp_loss_scaling_factor: float = 0.1
    layer_norm_epsilon: float = 1e-5  # GPT-2's LayerNorms
    rms_norm_epsilon: float = 1e-6  # the MTP input RMSNorms

    @property
    def head_dim(self):
        return self.hidden_dim // self.num_heads


def config_from_keras(model):
    """The `Config` of a Keras `MTPCausalLM` with a `GPT2Backbone`."""
    backbone = model.backbone
    layer = backbone.transformer_layers[0]
    rms_epsilon = 1e-6
    if model.mtp_block is not None:
        rms_epsilon = model.mtp_block.layer_norm_epsilon
    return Config(
        vocabulary_size=backbone.vocabulary_size,
        num_layers=backbone.num_layers,
        num_heads=backbone.num_heads,
        hidden_dim=backbone.hidden_dim,
        intermediate_dim=backbone.intermediate_dim,
        max_sequence_length=backbone.max_sequence_length,
        mtp_num_layers=model.mtp_num_layers,
        mtp_loss_scaling_factor=model.mtp_loss_scaling_factor,
        layer_norm_epsilon=layer.layer_norm_epsilon,
        rms_norm_epsilon=rms_epsilon,
    )


# === Parameters ===


def _init_block(key, c):
    d, h, hd, f = c.hidden_dim, c.num_heads, c.head_dim, c.intermediate_dim
    kq, kk, kv, ko, k1, k2 = jax.random.split(key, 6)

    def normal(k, shape):  # keras-hub's GPT-2 kernel initializer
        return 0.02 * jax.random.normal(k, shape, jnp.float32)

    return {
        "ln_1": _init_layer_norm(d),
        "attn": {
            "wq": normal(kq, (d, h, hd)),
            "bq": jnp.zeros((h, hd)),
            "wk": normal(kk, (d, h, hd)),
            "bk": jnp.zeros((h, hd)),
            "wv": normal(kv, (d, h, hd)),
            "bv": jnp.zeros((h, hd)),
            "wo": normal(ko, (h, hd, d)),
            "bo": jnp.zeros((d,)),
        },
        "ln_2": _init_layer_norm(d),
        "mlp": {
            "w_fc": normal(k1, (d, f)),
            "b_fc": jnp.zeros((f,)),
            "w_out": normal(k2, (f, d)),
            "b_out": jnp.zeros((d,)),
        },
    }


def _init_layer_norm(d):
    return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}


def init_params(key, config):
    """A fresh params pytree, initialized like keras-hub's GPT-2 and Keras'
    Dense (Glorot-uniform projection), RMSNorm scales 1.

    Layout (shapes for d, H, hd = d / H, f, V, D):
        wte (V, d), wpe (T_max, d), blocks [L × block], ln_f {scale, bias},
        mtp [D × {norm_e (d,), norm_h (d,), proj (2d, d), block, ln}]
        block: ln_1, attn {wq, wk, wv (d, H, hd), bq, bk, bv (H, hd),
        wo (H, hd, d), bo (d,)}, ln_2, mlp {w_fc (d, f), b_fc, w_out (f, d),
        b_out}
    """
    c = config
    d = c.hidden_dim
    keys = jax.random.split(key, 2 + c.num_layers + 2 * c.mtp_num_layers)
    params = {
        "wte": 0.01 * jax.random.normal(keys[0], (c.vocabulary_size, d)),
        "wpe": 0.02 * jax.random.normal(keys[1], (c.max_sequence_length, d)),
        "blocks": [_init_block(keys[2 + i], c) for i in range(c.num_layers)],
        "ln_f": _init_layer_norm(d),
        "mtp": [],
    }
    limit = (6.0 / (3 * d)) ** 0.5  # Glorot uniform of a (2d, d) kernel
    for k in range(c.mtp_num_layers):
        kp, kb = keys[2 + c.num_layers + 2 * k : 4 + c.num_layers + 2 * k]
        params["mtp"].append(
            {
                "norm_e": jnp.ones((d,)),
                "norm_h": jnp.ones((d,)),
                "proj": jax.random.uniform(
                    kp, (2 * d, d), minval=-limit, maxval=limit
                ),
                "block": _init_block(kb, c),
                "ln": _init_layer_norm(d),
            }
        )
    return params


def count_params(params):
    """Number of scalars in `params`."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# Keras variable path suffix of a decoder block -> key path in our block.
_BLOCK_KEYS = {
    "self_attention/query/kernel": ("attn", "wq"),
    "self_attention/query/bias": ("attn", "bq"),
    "self_attention/key/kernel": ("attn", "wk"),
    "self_attention/key/bias": ("attn", "bk"),
    "self_attention/value/kernel": ("attn", "wv"),
    "self_attention/value/bias": ("attn", "bv"),
    "self_attention/attention_output/kernel": ("attn", "wo"),
    "self_attention/attention_output/bias": ("attn", "bo"),
    "self_attention_layer_norm/gamma": ("ln_1", "scale"),
    "self_attention_layer_norm/beta": ("ln_1", "bias"),
    "feedforward_intermediate_dense/kernel": ("mlp", "w_fc"),
    "feedforward_intermediate_dense/bias": ("mlp", "b_fc"),
    "feedforward_output_dense/kernel": ("mlp", "w_out"),
    "feedforward_output_dense/bias": ("mlp", "b_out"),
    "feedforward_layer_norm/gamma": ("ln_2", "scale"),
    "feedforward_layer_norm/beta": ("ln_2", "bias"),
}
_MTP_KEYS = {
    "embedding_norm/scale": ("norm_e",),
    "hidden_norm/scale": ("norm_h",),
    "projection/kernel": ("proj",),
    "output_norm/gamma": ("ln", "scale"),
    "output_norm/beta": ("ln", "bias"),
}
_TOP_KEYS = {
    "token_embedding/embeddings": ("wte",),
    "position_embedding/embeddings": ("wpe",),
    "layer_norm/gamma": ("ln_f", "scale"),
    "layer_norm/beta": ("ln_f", "bias"),
}


def _key_path(path):
    """Where the Keras variable `path` goes in our pytree, or None."""
    match = re.search(r"(?:^|/)mtp_layer_(\d+)/(.*)$", path)
    if match:  # mtp_block/mtp_layer_{k}/...
        depth, rest = int(match.group(1)) - 1, match.group(2)
        if rest.startswith("transformer_block/"):
            rest = rest[len("transformer_block/") :]
            if rest in _BLOCK_KEYS:
                return ("mtp", depth, "block") + _BLOCK_KEYS[rest]
        elif rest in _MTP_KEYS:
            return ("mtp", depth) + _MTP_KEYS[rest]
        return None
    match = re.match(r"transformer_layer_(\d+)/(.*)$", path)
    if match and match.group(2) in _BLOCK_KEYS:
        return ("blocks", int(match.group(1))) + _BLOCK_KEYS[match.group(2)]
    return _TOP_KEYS.get(path)


def params_from_keras(model):
    """Copies the trainable weights of a Keras `MTPCausalLM` (GPT-2 backbone)
    into a params pytree laid out like `init_params`'s."""
    config = config_from_keras(model)
    # init_params' layout and shapes, without computing it.
    skeleton = jax.eval_shape(
        functools.partial(init_params, config=config), jax.random.key(0)
    )
    params = jax.tree.map(lambda leaf: None, skeleton)
    filled = set()
    for variable in model.trainable_weights:
        where = _key_path(variable.path)
        if where is None:
            raise ValueError(
                "No place in the reference params for the Keras variable "
                f"{variable.path} {tuple(variable.shape)}"
            )
        value = jnp.asarray(np.asarray(variable.numpy()), jnp.float32)
        expected = _lookup(skeleton, where).shape
        if value.shape != expected:
            raise ValueError(
                f"Shape mismatch for {variable.path}: Keras {value.shape}, "
                f"reference {expected}"
            )
        _lookup(params, where[:-1])[where[-1]] = value
        filled.add(where)
    total = len(jax.tree.leaves(skeleton))
    if len(filled) != total:
        raise ValueError(
            f"Filled {len(filled)} of the {total} reference params from the "
            "Keras model's trainable weights."
        )
    return params


def _lookup(tree, where):
    for key in where:
        tree = tree[key]
    return tree


# === Model ===


def layer_norm(p, x, epsilon):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * p["scale"] + p["bias"]


def rms_norm(scale, x, epsilon):
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(mean_square + epsilon) * scale


def attention(p, x, mask):
    """Multi-head self-attention; `mask` (B, 1, T, T) is True where allowed."""
    q = jnp.einsum("btd,dhk->bthk", x, p["wq"]) + p["bq"]  # (B, T, H, hd)
    k = jnp.einsum("btd,dhk->bthk", x, p["wk"]) + p["bk"]  # (B, T, H, hd)
    v = jnp.einsum("btd,dhk->bthk", x, p["wv"]) + p["bv"]  # (B, T, H, hd)
    scores = jnp.einsum("bthk,bshk->bhts", q, k)  # (B, H, T, T)
    scores = scores * (1.0 / np.sqrt(q.shape[-1]))
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)  # (B, H, T, T)
    out = jnp.einsum("bhts,bshk->bthk", probs, v)  # (B, T, H, hd)
    return jnp.einsum("bthk,hkd->btd", out, p["wo"]) + p["bo"]  # (B, T, d)


def block(p, x, mask, epsilon):
    """keras-hub's TransformerDecoder with normalize_first=True (GPT-2)."""
    x = x + attention(p["attn"], layer_norm(p["ln_1"], x, epsilon), mask)
    h = layer_norm(p["ln_2"], x, epsilon)
    h = jax.nn.gelu(h @ p["mlp"]["w_fc"] + p["mlp"]["b_fc"], approximate=True)
    return x + h @ p["mlp"]["w_out"] + p["mlp"]["b_out"]  # (B, T, d)


def attention_mask(padding_mask):
    """Causal and key-padding mask, (B, 1, T, T), True where allowed."""
    length = padding_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))  # (T, T)
    keys = padding_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, T)
    return jnp.logical_and(causal[None, None], keys)


def gpt2(params, token_ids, padding_mask, config):
    """The backbone: h⁰ (B, T, d), after the final LayerNorm."""
    length = token_ids.shape[1]
    mask = attention_mask(padding_mask)
    x = params["wte"][token_ids] + params["wpe"][:length]  # (B, T, d)
    for p in params["blocks"]:
        x = block(p, x, mask, config.layer_norm_epsilon)
    return layer_norm(params["ln_f"], x, config.layer_norm_epsilon)


def shift_left(x, k):
    """`x[:, i + k]`, 0 beyond the end (keras_mtp's roll_and_mask(x, -k))."""
    return jnp.pad(x[:, k:], ((0, 0), (0, k)))


def mtp_targets_and_weights(token_ids, padding_mask, k, segment_ids=None):
    """Depth k's targets x[i+k+1] (B, T) and 0/1 weights (B, T)."""
    ahead = k + 1
    mask = padding_mask.astype(bool)
    valid = jnp.logical_and(mask, shift_left(mask, ahead))
    if segment_ids is not None:  # packed rows: stay inside one segment
        valid = jnp.logical_and(valid, segment_ids != 0)
        for j in range(1, ahead + 1):
            valid = jnp.logical_and(
                valid, shift_left(segment_ids, j) == segment_ids
            )
    return shift_left(token_ids, ahead), valid.astype(jnp.float32)


def forward(params, batch, config):
    """Main logits (B, T, V) and the D depths' logits [(B, T, V)]."""
    token_ids, padding_mask = batch["token_ids"], batch["padding_mask"]
    hidden = gpt2(params, token_ids, padding_mask, config)  # (B, T, d)
    head = params["wte"].T  # (d, V), tied
    logits = hidden @ head  # (B, T, V)
    mask = attention_mask(padding_mask)
    mtp_logits = []
    for k, p in enumerate(params["mtp"], start=1):
        emb = params["wte"][shift_left(token_ids, k)]  # (B, T, d), Emb(x[i+k])
        u = jnp.concatenate(
            [
                rms_norm(p["norm_e"], emb, config.rms_norm_epsilon),
                rms_norm(p["norm_h"], hidden, config.rms_norm_epsilon),
            ],
            axis=-1,
        )  # (B, T, 2d), embedding first
        hidden = block(
            p["block"], u @ p["proj"], mask, config.layer_norm_epsilon
        )
        normed = layer_norm(p["ln"], hidden, config.layer_norm_epsilon)
        mtp_logits.append(normed @ head)  # (B, T, V)
    return logits, mtp_logits


def cross_entropy(logits, targets):
    """Per-token CE (B, T) = logsumexp(z) - z[t]."""
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logits[..., 0]


def loss_fn(params, batch, config):
    """Total loss and a dict of metrics (main_loss, mtp_loss, per depth)."""
    logits, mtp_logits = forward(params, batch, config)
    ce = cross_entropy(logits, batch["labels"])  # (B, T)
    # Keras' "sum_over_batch_size": divide by B·T, not by Σ w.
    main_loss = jnp.sum(ce * batch["sample_weight"]) / ce.size
    # The main head's accuracy, weighted, as Keras' compiled metric logs it.
    hits = (jnp.argmax(logits, axis=-1) == batch["labels"]).astype(jnp.float32)
    accuracy = jnp.sum(hits * batch["sample_weight"]) / jnp.maximum(
        jnp.sum(batch["sample_weight"]), 1.0
    )
    metrics = {"main_loss": main_loss, "accuracy": accuracy}
    total = main_loss
    if mtp_logits:
        losses, accuracies = [], []
        for k, z in enumerate(mtp_logits, start=1):
            targets, w = mtp_targets_and_weights(
                batch["token_ids"],
                batch["padding_mask"],
                k,
                batch.get("segment_ids"),
            )
            denominator = jnp.maximum(jnp.sum(w), 1.0)
            losses.append(jnp.sum(cross_entropy(z, targets) * w) / denominator)
            hits = (jnp.argmax(z, axis=-1) == targets).astype(jnp.float32)
            accuracies.append(jnp.sum(hits * w) / denominator)
        losses = jnp.stack(losses)  # (D,)
        metrics["mtp_loss"] = jnp.mean(losses)
        metrics["mtp_losses"] = losses
        metrics["mtp_accuracies"] = jnp.stack(accuracies)
        total = total + config.mtp_loss_scaling_factor * metrics["mtp_loss"]
    metrics["loss"] = total
    return total, metrics


def make_batch(x, y, sample_weight=None):
    """The reference batch from Keras' `(x, y, sample_weight)`.

    `x` is the dict `MTPCausalLM` takes (`token_ids`, `padding_mask`, optional
    `segment_ids`), `y` the next tokens (B, T), `sample_weight` the main loss
    weights (B, T) (all ones when None).
    """
    token_ids = jnp.asarray(x["token_ids"], jnp.int32)
    padding_mask = x.get("padding_mask")
    if padding_mask is None:  # as MTPCausalLM: every token is real
        padding_mask = jnp.ones_like(token_ids)
    batch = {
        "token_ids": token_ids,
        "padding_mask": jnp.asarray(padding_mask, jnp.int32),
        "labels": jnp.asarray(y, jnp.int32),
    }
    if sample_weight is None:
        sample_weight = np.ones(np.shape(y), np.float32)
    batch["sample_weight"] = jnp.asarray(sample_weight, jnp.float32)
    if x.get("segment_ids") is not None:
        batch["segment_ids"] = jnp.asarray(x["segment_ids"], jnp.int32)
    return batch


# === Training ===


def keras_adam_eps(epsilon=1e-7, beta_2=0.999, step=1):
    """The optax `eps` that gives Keras Adam's update (`epsilon`) at `step`."""
    return epsilon / (1.0 - beta_2**step) ** 0.5


def make_train_step(config, optimizer):
    """A jitted `train_step(params, opt_state, batch)` ->
    `(params, opt_state, metrics)` for an optax `optimizer`."""
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, config=config), has_aux=True
    )

    @jax.jit
    def train_step(params, opt_state, batch):
        (_, metrics), grads = grad_fn(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return train_step
