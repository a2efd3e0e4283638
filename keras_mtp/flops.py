"""What Multi-Token Prediction costs per token: a FLOP model.

Forward FLOPs per token, 2 per multiply-add, for a decoder of `L` blocks with
hidden size `d`, feed-forward size `f`, sequence length `T` and vocabulary `V`:

```
block     = 8d² + 4df + 4Td      Q, K, V, O projections; two FFN matrices;
                                 scores QKᵀ and their product with V
head      = 2dV                  the output head (shared by every MTP depth)
depth     = block + 4d² + 2dV    one MTP depth: its block, its 2d → d
                                 projection and one more head matmul
overhead(D) = D · depth / (L · block + 2dV)
```

and the predicted step time with `D` depths, relative to `D = 0`, is
`1 + overhead(D)`. Training (backward ≈ 2 × forward) scales every term alike,
so the ratio holds for a training step. Left out: embedding lookups, norms,
softmax, the cross-entropy's `exp` over `V`, and the optimizer update (per
parameter, not per token). `4Td` counts all `T × T` scores, as keras-hub's
masked attention computes them (a causal kernel does half); a gated FFN
(SwiGLU, as in Llama) has three matrices, `6df`, and grouped-query attention
shrinks `8d²`: use the formulas as an estimate, not a prediction to 1 %.

    python -m keras_mtp.flops    # the overhead of D = 1, 2, 4 at 1B and 7B

For logging throughput, `training_flops_per_token(model, T)` counts a built
model's own weights instead (gated FFNs, grouped-query attention, untied
heads and MoE routing included, MTP depths included), and
`model_flops_utilization` divides the achieved FLOP/s by the devices' peak
(`peak_flops_per_device`), as MaxText and the PaLM paper define MFU.
"""

import math

# Llama-like sizes (attention and FFN counted as above, not as gated / GQA).
SIZES = {
    "1B (Llama-3.2-1B-like)": dict(d=2048, L=16, f=8192, T=4096, V=128256),
    "7B (Llama-2-7B-like)": dict(d=4096, L=32, f=11008, T=4096, V=32000),
}


def _check(**sizes):
    for name, value in sizes.items():
        minimum = 0 if name == "D" else 1
        if not isinstance(value, int) or value < minimum:
            raise ValueError(
                f"`{name}` must be an int >= {minimum}. Received: "
                f"{name}={value!r}"
            )


def block_flops(d, f, T):
    """Forward FLOPs per token of one transformer block: `8d² + 4df + 4Td`.

    `8d²`: the Q, K, V and output projections; `4df`: the two feed-forward
    matrices; `4Td`: the attention scores `QKᵀ` and their product with `V`.
    """
    _check(d=d, f=f, T=T)
    return 8 * d * d + 4 * d * f + 4 * T * d


def head_flops(d, V):
    """Forward FLOPs per token of the output head: `2dV`."""
    _check(d=d, V=V)
    return 2 * d * V


def depth_flops(d, f, T, V):
    """Forward FLOPs per token of one MTP depth: `block + 4d² + 2dV`.

    Its own transformer block, its `2d → d` projection of the concatenated
    (embedding, hidden) pair, and one more product with the shared head.
    """
    return block_flops(d, f, T) + 4 * d * d + head_flops(d, V)


def mtp_overhead(d, f, T, V, L, D):
    """Extra FLOPs of `D` MTP depths over the plain model of `L` blocks.

    `overhead(D) = D · (block + 4d² + 2dV) / (L · block + 2dV)`, a fraction
    (0.25 = 25 % more); `overhead(0) == 0`. The predicted step-time ratio to
    `D = 0` is `1 + overhead(D)`.
    """
    _check(L=L, D=D)
    trunk = L * block_flops(d, f, T) + head_flops(d, V)
    return D * depth_flops(d, f, T, V) / trunk


def predicted_step_ratio(d, f, T, V, L, D):
    """Predicted step time with `D` depths over that with none:
    `1 + mtp_overhead(d, f, T, V, L, D)`."""
    return 1.0 + mtp_overhead(d, f, T, V, L, D)


def overhead_table(sizes=None, depths=(1, 2, 4)):
    """One dict per (size, `D`): the sizes, FLOPs per token and overhead."""
    rows = []
    for name, s in (sizes or SIZES).items():
        d, L, f, T, V = s["d"], s["L"], s["f"], s["T"], s["V"]
        trunk = L * block_flops(d, f, T) + head_flops(d, V)
        for D in depths:
            rows.append(
                dict(
                    model=name,
                    **s,
                    D=D,
                    trunk_flops=trunk,
                    depth_flops=depth_flops(d, f, T, V),
                    head_share=head_flops(d, V) / trunk,
                    overhead=mtp_overhead(d, f, T, V, L, D),
                )
            )
    return rows


# === Throughput ===

# Peak dense bfloat16 FLOP/s of one device, by the start of JAX's
# `device.device_kind` (the longest matching entry wins). Sources: Google
# Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e: "peak compute per chip, bf16") and NVIDIA's data sheets (dense
# Tensor Core BF16, without the 2x of structured sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12,  # TPU v4: 275 TFLOP/s bf16 per chip
    "TPU v5 lite": 197e12,  # TPU v5e: 197 TFLOP/s bf16 per chip
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # TPU v5p ("TPU v5" in JAX): 459 TFLOP/s bf16
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # TPU v6e (Trillium): 918 TFLOP/s bf16 per chip
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # H100 SXM data sheet: 989 TFLOP/s bf16 dense
    "NVIDIA H100 PCIe": 756e12,  # H100 PCIe data sheet: 756 TFLOP/s
    "NVIDIA H100 NVL": 835e12,  # H100 NVL data sheet: 835 TFLOP/s
    "NVIDIA H200": 989e12,  # H200 data sheet: 989 TFLOP/s bf16 dense
    "NVIDIA A100": 312e12,  # A100 data sheet (SXM and PCIe): 312 TFLOP/s
}


def peak_flops_per_device(device_kind):
    """Peak dense bf16 FLOP/s of a device (`PEAK_FLOPS`), or None where it
    is not known (CPUs)."""
    matches = [k for k in PEAK_FLOPS if str(device_kind).startswith(k)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def _embedding_variables(backbone):
    """Ids of the variables read by lookup, not by a matmul: the token
    embedding (its use as the output head is counted apart) and position
    embeddings."""
    ids = {id(v) for v in backbone.token_embedding.weights}
    for v in backbone.weights:
        if "position_embedding" in v.path:
            ids.add(id(v))
    return ids


def _experts_used(backbone):
    """`(num_experts, top_k)` of an MoE backbone, or None."""
    config = backbone.get_config()
    num_experts = config.get("num_experts")
    top_k = config.get("top_k", config.get("num_experts_per_tok"))
    if num_experts and top_k:
        return int(num_experts), int(top_k)
    return None


def forward_flops_per_token(model, sequence_length):
    """Forward FLOPs per token of a built `MTPCausalLM` (or keras-hub task
    with a `backbone`), MTP depths included.

    `2 × (matmul weights used per token) + 4·T·d_attention per attention
    layer`: every weight matrix of the trunk and of each MTP depth (its
    block and `2d → d` projection) is used once per token, the output head
    (`V·d`, tied or not) `1 + D` times (main head and each depth), an MoE
    expert weight `top_k / num_experts` of the time; `4·T·d_attention`
    counts all `T × T` attention scores and their product with the values,
    as keras-hub's masked attention computes them (`d_attention` = query
    heads × head size, taken as `hidden_dim`). Embedding lookups, norms and
    softmax are left out.

    Args:
        model: a built `keras_mtp.MTPCausalLM`.
        sequence_length: int. `T`.

    Returns:
        An int: FLOPs per token of one forward pass.
    """
    _check(T=sequence_length)
    backbone = model.backbone
    depths = int(getattr(model, "mtp_num_layers", 0) or 0)
    lookups = _embedding_variables(backbone)
    moe = _experts_used(backbone)
    matmul = 0.0
    for v in model.weights:
        if id(v) in lookups or len(v.shape) < 2:
            continue
        size = math.prod(v.shape)
        if moe and len(v.shape) == 3 and v.shape[0] == moe[0]:
            size = size * moe[1] / moe[0]  # (experts, in, out): top_k used
        matmul += size
    head = backbone.token_embedding
    head_size = math.prod(head.embeddings.shape)  # V · d
    attention_layers = backbone.num_layers + depths
    attention = 4 * sequence_length * backbone.hidden_dim * attention_layers
    return int(2 * (matmul + (1 + depths) * head_size) + attention)


def training_flops_per_token(model, sequence_length):
    """FLOPs per token of a training step: `3 ×` the forward pass (the
    backward pass costs two forward passes), MTP depths included."""
    return 3 * forward_flops_per_token(model, sequence_length)


def model_flops_utilization(tokens_per_second, flops_per_token, peak_flops):
    """MFU: achieved model FLOP/s over the peak of all devices together.

    Args:
        tokens_per_second: float. Global training throughput.
        flops_per_token: float. `training_flops_per_token`.
        peak_flops: float or None. Peak FLOP/s of all devices together
            (`peak_flops_per_device` × devices); None gives NaN ("n/a").
    """
    if not peak_flops:
        return float("nan")
    return tokens_per_second * flops_per_token / peak_flops


def format_table(rows):
    """`overhead_table` rows as a markdown table."""
    lines = [
        "| model | d | L | f | T | V | D | trunk GFLOP/token | depth "
        "GFLOP/token | head / trunk | overhead | predicted ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['d']} | {r['L']} | {r['f']} | {r['T']} "
            f"| {r['V']} | {r['D']} | {r['trunk_flops'] / 1e9:.3f} "
            f"| {r['depth_flops'] / 1e9:.3f} | {100 * r['head_share']:.1f} % "
            f"| {100 * r['overhead']:.1f} % | {1 + r['overhead']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print("Forward FLOPs per token (x2 per multiply-add); overhead(D) =")
    print("D (block + 4d² + 2dV) / (L block + 2dV), block = 8d² + 4df + 4Td\n")
    print(format_table(overhead_table()))
