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
"""

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
