"""How much faster is greedy decoding with the MTP heads as drafters?

    python benchmarks/bench_decode.py   # trains 2 models, then decodes
    python benchmarks/bench_decode.py --out=results.json

For each `D` in `--depths` (default 1 and 3) it trains the default `train.py`
model with `--mtp-num-layers D` on the built-in code corpus (the Python
standard library) into `<runs-dir>/d<D>`, or reuses that run if it is
finished. Then, in this one process (JAX backend), it decodes `--prompts`
held-out prompts (the first `--prompt-length` tokens of rows of the run's
validation files) one at a time (batch 1) to `--new-tokens` more tokens,
greedily, plain (keras-hub's `CausalLM.generate`, KV cache) and speculative
(`MTPCausalLM.generate`), alternating the two for `--rounds` rounds after a
warm-up that compiles both. Both outputs are checked to be identical.

It reports, per `D`: tokens per main forward pass; the acceptance of each
depth's drafts, next to the run's teacher-forced validation `mtp_accuracy_k`
(the same prediction on held-out text: the model's own greedy output is
easier to draft, all the more when it loops, which the share of distinct
4-grams shows); the wall time per main forward of each mode; and the
wall-clock tokens/s of speculative over plain (median over rounds of the
paired ratios), as a markdown table and as JSON.
"""

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_mtp  # noqa: E402, F401 (registers the model class)
from keras_mtp import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(depth, run_dir, steps):
    """Runs (or finishes) `train.py` for `depth` into `run_dir`."""
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        f"--mtp-num-layers={depth}",
        f"--output-dir={run_dir}",
    ]
    if steps is not None:
        command += [f"--steps={steps}", f"--eval-interval={steps}"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def held_out_prompts(run_dir, num_prompts, prompt_length):
    """The first `prompt_length` tokens of rows of the run's validation
    files (train.py's own split of the corpus)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    files = data.list_corpus_files(config["data"])
    _, val_files = data.split_files(
        files, config["validation_fraction"], seed=config["seed"]
    )
    dataset = data.make_dataset(
        val_files,
        sequence_length=prompt_length,
        batch_size=num_prompts,
        shuffle=False,
        cache_dir=os.path.join(os.path.dirname(run_dir), ".token_cache"),
    )
    x, _, _ = next(iter(dataset))
    return np.asarray(x["token_ids"])


def teacher_forced_accuracy(run_dir, depth):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        last = list(csv.DictReader(f))[-1]
    return [float(last[f"val_mtp_accuracy_{k}"]) for k in range(1, depth + 1)]


def distinct_share(rows, n=4):
    """Share of the generated n-grams that are distinct, per row, averaged:
    near 0 when greedy decoding loops (where drafting is easy)."""
    shares = []
    for row in rows:
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        shares.append(len(set(grams)) / max(len(grams), 1))
    return float(np.mean(shares))


def decode(model, prompts, max_length, rounds):
    """Times plain and speculative decoding of each prompt, alternating."""
    for speculative in (False, True):  # compile both
        model.generate(
            prompts[0], max_length=max_length, speculative=speculative
        )
    seconds = {False: [], True: []}
    passes = {False: 0, True: 0}
    acceptance, generated = [], []
    for _ in range(rounds):
        elapsed = {False: 0.0, True: 0.0}
        for prompt in prompts:
            outputs = {}
            for speculative in (False, True):
                start = time.perf_counter()
                outputs[speculative], stats = model.generate(
                    prompt,
                    max_length=max_length,
                    speculative=speculative,
                    return_stats=True,
                )
                elapsed[speculative] += time.perf_counter() - start
                passes[speculative] += stats["forward_passes"]
                if speculative:
                    acceptance.append(stats["acceptance"])
            np.testing.assert_array_equal(
                outputs[True]["token_ids"], outputs[False]["token_ids"]
            )
            generated.append(outputs[True]["token_ids"][0, len(prompt) :])
        for speculative in (False, True):
            seconds[speculative].append(elapsed[speculative])
    tokens = rounds * len(prompts) * (max_length - prompts.shape[1])
    per_round = tokens / rounds
    return {
        "tokens_per_forward": tokens / passes[True],
        "acceptance": np.mean(acceptance, axis=0).round(4).tolist(),
        "distinct_4gram_share": distinct_share(generated),
        "plain_tokens_per_s": per_round / statistics.median(seconds[False]),
        "speculative_tokens_per_s": per_round
        / statistics.median(seconds[True]),
        "speedup": statistics.median(
            p / s for p, s in zip(seconds[False], seconds[True])
        ),
        # Wall time of one main forward pass (plus, speculative, drafting).
        "plain_ms_per_forward": 1e3 * sum(seconds[False]) / passes[False],
        "speculative_ms_per_forward": 1e3 * sum(seconds[True]) / passes[True],
        "plain_s_per_round": [round(s, 4) for s in seconds[False]],
        "speculative_s_per_round": [round(s, 4) for s in seconds[True]],
    }


def main(args):
    rows = []
    for depth in args.depths:
        run_dir = os.path.abspath(os.path.join(args.runs_dir, f"d{depth}"))
        train(depth, run_dir, args.steps)
        model = keras.models.load_model(os.path.join(run_dir, "last.keras"))
        prompts = held_out_prompts(run_dir, args.prompts, args.prompt_length)
        max_length = args.prompt_length + args.new_tokens
        result = decode(model, prompts, max_length, args.rounds)
        result.update(
            depth=depth,
            teacher_forced_accuracy=teacher_forced_accuracy(run_dir, depth),
        )
        rows.append(result)
        print(json.dumps(result), flush=True)
    report = {
        "config": dict(
            backend=keras.config.backend(),
            model="train.py default (llama d=64, L=2, byte vocabulary)",
            depths=args.depths,
            train_steps=args.steps or "train.py default",
            prompts=args.prompts,
            prompt_length=args.prompt_length,
            new_tokens=args.new_tokens,
            rounds=args.rounds,
            batch_size=1,
        ),
        "machine": dict(
            date=time.strftime("%Y-%m-%d"),
            platform=platform.platform(),
            cpu_count=os.cpu_count(),
        ),
        "rows": rows,
    }
    print(
        "\n| D | tokens / main forward | acceptance per depth | teacher-forced"
        " val accuracy | distinct 4-grams | ms / forward plain |"
        " ms / forward speculative | tokens/s plain | tokens/s speculative |"
        " speed-up |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['depth']} | {r['tokens_per_forward']:.2f} | "
            + ", ".join(f"{a:.2f}" for a in r["acceptance"])
            + " | "
            + ", ".join(f"{a:.2f}" for a in r["teacher_forced_accuracy"])
            + f" | {r['distinct_4gram_share']:.2f}"
            f" | {r['plain_ms_per_forward']:.2f}"
            f" | {r['speculative_ms_per_forward']:.2f}"
            f" | {r['plain_tokens_per_s']:.0f}"
            f" | {r['speculative_tokens_per_s']:.0f} | {r['speedup']:.2f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--runs-dir", default="runs/bench_decode")
    parser.add_argument(
        "--steps", type=int, default=None, help="train.py steps (its default)"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the JSON here")
    main(parser.parse_args())
