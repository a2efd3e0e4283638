"""The report of a training run, as train.py prints and plots it.

- `plot_losses`: the main and per-depth loss curves (`losses.png`) from
  the rows of `keras_mtp.callbacks.TrainingLossLog` and of a `CSVLogger`.
- `summary_table`: the final loss and accuracy of every head, as text.
- `speculation_report`: what self-speculative decoding buys a trained
  `MTPCausalLM`: tokens per forward pass of the main model (at most
  `D + 1`) and how often each depth's draft is accepted.
"""

import numpy as np

from keras_mtp.validation import check_int


def speculation_report(model, prompts, max_length):
    """Greedy speculative decoding of each prompt (batch 1), summarized.

    Args:
        model: `MTPCausalLM` with `mtp_num_layers >= 1`.
        prompts: int array `(N, P)`: N prompts of P tokens.
        max_length: int > P. The length each prompt is decoded to.

    Returns:
        str: tokens per main forward pass (averaged over every generated
        position) and the acceptance rate of each depth.

    Example:

    ```python
    print(keras_mtp.report.speculation_report(model, x[:4, :32], 96))
    ```
    """
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not len(prompts):
        raise ValueError(
            "`prompts` must be token ids of shape (N, P) with N >= 1. "
            f"Received: shape={prompts.shape}"
        )
    prompt_length = prompts.shape[1]
    max_length = check_int(max_length, "max_length", minimum=prompt_length + 1)
    positions = forward_passes = 0
    acceptance = []
    for prompt in prompts:  # batch 1: each prompt advances on its own
        _, stats = model.generate(
            prompt, max_length=max_length, return_stats=True
        )
        positions += max_length - prompt_length
        forward_passes += stats["forward_passes"]
        acceptance.append(stats["acceptance"])
    rates = ", ".join(
        f"depth {k}: {rate:.2f}"
        for k, rate in enumerate(np.mean(acceptance, axis=0), start=1)
    )
    return (
        f"Speculative decoding of {len(prompts)} validation prompts "
        f"({prompt_length} + {max_length - prompt_length} tokens, greedy): "
        f"{positions / forward_passes:.2f} tokens per main forward pass "
        f"(at most {model.mtp_num_layers + 1}); draft acceptance {rates}"
    )


def plot_losses(train_rows, eval_rows, mtp_num_layers, path):
    """`losses.png`: main and per-depth losses; training every
    `--log-interval` steps (`train_losses.csv`), validation at each
    evaluation (`metrics.csv`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["main_loss"] + [
        f"mtp_loss_{k}" for k in range(1, mtp_num_layers + 1)
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = (
        (axes[0], train_rows, "", "train", None),
        (axes[1], eval_rows, "val_", "validation", "o"),
    )
    for ax, rows, prefix, title, marker in panels:
        for key in keys:
            if rows and prefix + key in rows[0]:
                steps = [int(row["step"]) for row in rows]
                values = [float(row[prefix + key]) for row in rows]
                ax.plot(steps, values, marker=marker, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats per token)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(logs, mtp_num_layers):
    """Final loss and accuracy per head, train and validation, as text."""

    def cell(key):
        return f"{float(logs[key]):10.4f}" if key in logs else f"{'-':>10}"

    heads = [("main (token +1)", "main_loss", "sparse_categorical_accuracy")]
    heads += [
        (
            f"MTP depth {k} (token +{k + 1})",
            f"mtp_loss_{k}",
            f"mtp_accuracy_{k}",
        )
        for k in range(1, mtp_num_layers + 1)
    ]
    lines = [
        f"{'head':<24}{'train loss':>12}{'val loss':>12}"
        f"{'train acc':>12}{'val acc':>12}"
    ]
    for name, loss, accuracy in heads:
        lines.append(
            f"{name:<24}  {cell(loss)}  {cell('val_' + loss)}"
            f"  {cell(accuracy)}  {cell('val_' + accuracy)}"
        )
    return "\n".join(lines)
