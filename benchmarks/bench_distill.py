"""Do MTP heads distilled from a frozen trunk draft better than heads
trained on the data's labels?

    python benchmarks/bench_distill.py
    python benchmarks/bench_distill.py --out=results.json

In one process (JAX backend): trains a plain causal LM (`--trunk-steps`,
byte-level, the default `train.py` Llama on the Python standard library),
freezes it, then trains `--depths` MTP heads on it twice from the same
initial weights for `--head-steps` steps each: once with `mtp_targets=
"labels"` (the data's next tokens) and once with `mtp_targets="main"` (the
trunk's own distribution for the same token). For each it reports

- on held-out text (`evaluate` on the validation files): `mtp_accuracy_k`
  (top-1 against the data) and `mtp_acceptance_k` (top-1 equal to the main
  head's top-1, what greedy speculation accepts);
- greedy speculative decoding of `--prompts` held-out prompts at batch 1:
  tokens per main forward pass and the measured acceptance of each depth;
- `mtp_acceptance_k` evaluated on the generated part of the decoded
  sequences themselves (the text that speculation actually drafts on), to
  see how well the metric predicts the measured acceptance when computed on
  that text rather than on the data. (Speculation drafts depth 1 only at the
  positions where a verification step starts, a subset of them.)

It prints a markdown table and writes the figures, the date and the command
as JSON (`--out`, default `benchmarks/results/bench_distill_<date>_cpu.json`).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_mtp  # noqa: E402
from keras_mtp import backbones  # noqa: E402
from keras_mtp import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, default=2, help="MTP depths D.")
    p.add_argument("--trunk-steps", type=int, default=600)
    p.add_argument("--head-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--trunk-learning-rate", type=float, default=3e-3)
    p.add_argument("--head-learning-rate", type=float, default=2e-3)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def datasets(args):
    """Train and validation datasets of the stdlib corpus (bytes), split by
    file as `train.py` splits it."""
    files = data.list_corpus_files(None)
    train_files, val_files = data.split_files(files, 0.05, seed=args.seed)
    kwargs = dict(sequence_length=args.sequence_length, seed=args.seed)
    train = data.make_dataset(train_files, batch_size=args.batch_size, **kwargs)
    val = data.make_dataset(
        val_files, batch_size=args.batch_size, shuffle=False, **kwargs
    )
    return train, val


def adam(learning_rate, steps):
    schedule = keras_mtp.callbacks.warmup_cosine(
        learning_rate, steps, warmup_steps=steps // 10
    )
    return keras.optimizers.Adam(schedule)


def train_trunk(args, train):
    """A plain causal LM (no MTP), `train.py`'s default Llama."""
    keras.utils.set_random_seed(args.seed)
    backbone = backbones.build_backbone(
        "llama",
        vocabulary_size=data.VOCABULARY_SIZE,
        hidden_dim=64,
        num_layers=2,
        num_heads=4,
        intermediate_dim=128,
        sequence_length=args.sequence_length,
    )
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=0)
    model.compile(optimizer=adam(args.trunk_learning_rate, args.trunk_steps))
    start = time.perf_counter()
    model.fit(train, steps_per_epoch=args.trunk_steps, epochs=1, verbose=0)
    return backbone, time.perf_counter() - start


def train_heads(args, backbone, targets, train):
    """MTP heads on the frozen `backbone`; the same initial weights for
    every `targets` (the seed is reset before they are made)."""
    backbone.trainable = False
    keras.utils.set_random_seed(args.seed + 1)
    model = keras_mtp.MTPCausalLM(
        backbone,
        mtp_num_layers=args.depths,
        mtp_loss_scaling_factor=1.0,
        mtp_detach_trunk=True,
        mtp_targets=targets,
    )
    model.compile(optimizer=adam(args.head_learning_rate, args.head_steps))
    start = time.perf_counter()
    model.fit(train, steps_per_epoch=args.head_steps, epochs=1, verbose=0)
    return model, time.perf_counter() - start


def held_out_prompts(args, val):
    x, _, _ = next(iter(val))
    return np.asarray(x["token_ids"])[: args.prompts, : args.prompt_length]


def decode(args, model, prompts):
    """Greedy speculative decoding at batch 1: `(sequences, stats)`, the
    `generate` stats `tokens_per_forward` and per-depth `acceptance`
    averaged over the prompts."""
    max_length = args.prompt_length + args.new_tokens
    sequences, per_forward, acceptance = [], [], []
    for prompt in prompts:
        outputs, stats = model.generate(
            prompt, max_length=max_length, speculative=True, return_stats=True
        )
        sequences.append(np.asarray(outputs["token_ids"]).reshape(-1))
        per_forward.append(float(np.mean(stats["tokens_per_forward"])))
        acceptance.append(stats["acceptance"])
    return np.stack(sequences), {
        "tokens_per_forward": float(np.mean(per_forward)),
        "acceptance": np.mean(acceptance, axis=0).tolist(),
    }


def metrics(logs, depths, prefix="mtp_"):
    return {
        key: [float(logs[f"{prefix}{key}_{k}"]) for k in range(1, depths + 1)]
        for key in ("accuracy", "acceptance", "loss")
    }


def measure(args, model, val, prompts):
    logs = model.evaluate(
        val, steps=args.eval_steps, return_dict=True, verbose=0
    )
    sequences, decoded = decode(args, model, prompts)
    # mtp_acceptance on the decoded text itself: x = the sequences, y the
    # next tokens (the main head's greedy choices, by construction). Segment
    # 0 (no MTP weight) = the prompt (data), 1 = the generated tokens: a
    # real token of id 0 stays visible to every later one (the generated
    # tokens still attend to the prompt), so only the MTP weights change:
    # only positions whose input and targets were all generated count.
    tokens = sequences[:, :-1]
    segments = np.where(np.arange(tokens.shape[1]) < args.prompt_length, 0, 1)
    x = {
        "token_ids": tokens,
        "padding_mask": np.ones_like(tokens),
        "segment_ids": np.broadcast_to(segments, tokens.shape).astype("int32"),
    }
    own = model.evaluate(
        x,
        sequences[:, 1:],
        batch_size=len(sequences),
        verbose=0,
        return_dict=True,
    )
    return {
        "held_out": metrics(logs, args.depths),
        "main_accuracy": float(logs["sparse_categorical_accuracy"]),
        "decoded": decoded,
        "on_decoded_text": metrics(own, args.depths),
        "replayed": replay(args, model, sequences),
    }


def replay(args, model, sequences):
    """Greedy speculation replayed on the decoded sequences from the
    teacher-forced top-1 ids (those `mtp_acceptance_k` compares): drafts
    only at the positions where the real loop drafted (each step starts
    after the accepted drafts and the main model's token), so it tells
    whether the gap between `mtp_acceptance_k` and the measured acceptance
    is where speculation drafts or what it computes."""
    x = {"token_ids": sequences, "padding_mask": np.ones_like(sequences)}
    hidden = model.backbone(x)
    drafts = keras.ops.convert_to_numpy(
        model.mtp_block(hidden, sequences, x["padding_mask"])["predictions"]
    )  # (D, B, T): depth k's top-1 at i, a draft of x[i + k + 1]
    accepted = np.zeros(args.depths)
    tried = np.zeros(args.depths)
    every = np.zeros(args.depths)  # the same, over every generated position
    every_tried = np.zeros(args.depths)
    length = sequences.shape[1]
    for row, seq in enumerate(sequences):
        for i in range(args.prompt_length - 1, length - 1):
            for k in range(1, args.depths + 1):
                if i + k + 1 >= length:
                    break
                every_tried[k - 1] += 1
                hit = drafts[k - 1, row, i] == seq[i + k + 1]
                every[k - 1] += hit
                if not hit:
                    break
        i = args.prompt_length - 1  # the prefill made x[P]; depth k drafts
        while i + 2 < length:
            step = 1
            for k in range(1, args.depths + 1):
                if i + k + 1 >= length:
                    break
                tried[k - 1] += 1
                if drafts[k - 1, row, i] != seq[i + k + 1]:
                    break
                accepted[k - 1] += 1
                step += 1
            i += step
    return {
        "acceptance_at_draft_positions": (
            accepted / np.maximum(tried, 1)
        ).tolist(),
        "acceptance_at_every_position": (
            every / np.maximum(every_tried, 1)
        ).tolist(),
    }


def table(results, depths):
    def row(values):
        return " / ".join(f"{v:.3f}" for v in values)

    lines = [
        "| targets | mtp_accuracy_k (held-out) | mtp_acceptance_k "
        "(held-out) | mtp_acceptance_k (decoded text) | measured acceptance "
        "per depth | replayed at the draft positions | tokens / main "
        "forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for targets, r in results.items():
        lines.append(
            f"| {targets} | {row(r['held_out']['accuracy'])} | "
            f"{row(r['held_out']['acceptance'])} | "
            f"{row(r['on_decoded_text']['acceptance'])} | "
            f"{row(r['decoded']['acceptance'])} | "
            f"{row(r['replayed']['acceptance_at_draft_positions'])} | "
            f"{r['decoded']['tokens_per_forward']:.3f} (max {depths + 1}) |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    train, val = datasets(args)
    backbone, trunk_seconds = train_trunk(args, train)
    print(f"trunk: {args.trunk_steps} steps in {trunk_seconds:.0f} s")
    prompts = held_out_prompts(args, val)
    results, seconds = {}, {}
    for targets in ("labels", "main"):
        model, seconds[targets] = train_heads(args, backbone, targets, train)
        results[targets] = measure(args, model, val, prompts)
        print(
            f"heads ({targets}): {args.head_steps} steps in "
            f"{seconds[targets]:.0f} s"
        )
    print(table(results, args.depths))
    for targets, r in results.items():
        gap = [
            a - b
            for a, b in zip(
                r["held_out"]["acceptance"], r["decoded"]["acceptance"]
            )
        ]
        print(
            f"{targets}: held-out mtp_acceptance_k minus measured "
            f"acceptance: {', '.join(f'{g:+.3f}' for g in gap)}"
        )
    date = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "date": date.isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "backend": keras.config.backend(),
        "args": vars(args),
        "model": "llama d=64 L=2 heads=4 ffn=128, bytes (V=258)",
        "trunk_seconds": trunk_seconds,
        "head_seconds": seconds,
        "results": results,
    }
    out = args.out or os.path.join(
        ROOT,
        "benchmarks",
        "results",
        f"bench_distill_{date:%Y-%m-%d}_cpu.json",
    )
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
