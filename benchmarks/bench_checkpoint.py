"""What do train.py's asynchronous Orbax checkpoints cost? With vs without.

    python benchmarks/bench_checkpoint.py        # ~6 min on 2 CPU cores
    python benchmarks/bench_checkpoint.py --interval=50 --rounds=3 --out=x.json

One process, JAX backend. `train.py`'s default model (llama d=64, L=2, MTP
D=2, T=128, batch 16, bytes) is trained with `model.fit` on random tokens
(the input pipeline is measured by bench_input.py), one epoch per
`--interval` steps (train.py's `--eval-interval`, default 300). Rounds of two
epochs alternate: "with" rounds write a `keras.callbacks.OrbaxCheckpoint`
(asynchronous, as train.py writes it) at the end of each epoch, "without"
rounds write none. The second epoch of a round is timed, from its start to
the end of its `on_epoch_end` (so it includes starting a write and the steps
that run while the previous write finishes in the background): the steady
state of a checkpoint every `--interval` steps. It reports the median time
per step of each and their ratio (1.00 = checkpoints cost nothing), as a
markdown table and as JSON (to `--out` when given).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tf.data only: quiet

import absl.logging  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from keras_mtp import data  # noqa: E402


class EveryOtherRound(keras.callbacks.Callback):
    """Checkpoints in "with" rounds (odd rounds: epochs 2-3, 6-7, ...) and
    times the second epoch of every round."""

    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self.times = {"with": [], "without": []}

    def set_model(self, model):
        super().set_model(model)
        self.checkpoint.set_model(model)

    def mode(self, epoch):
        return "with" if (epoch // 2) % 2 else "without"

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.mode(epoch) == "with":
            self.checkpoint.on_epoch_end(epoch, logs)
        if epoch % 2 == 1:  # the round's second epoch
            self.times[self.mode(epoch)].append(
                time.perf_counter() - self._start
            )

    def on_train_end(self, logs=None):
        self.checkpoint.on_train_end(logs)


def main(args, directory):
    absl.logging.set_verbosity(absl.logging.ERROR)
    config = train.Config()
    keras.utils.set_random_seed(0)
    model = train.build_model(config, 64 * -(-data.VOCABULARY_SIZE // 64))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, data.VOCABULARY_SIZE, 2_000_000).astype(np.uint16)
    dataset = data.make_dataset(
        tokens, config.sequence_length, config.batch_size
    )
    timer = EveryOtherRound(
        keras.callbacks.OrbaxCheckpoint(
            directory, save_freq="epoch", max_to_keep=2
        )
    )
    # Rounds 0 ("without", also the warm-up that compiles), 1 ("with"), ...
    epochs = 2 * (2 * args.rounds + 1)
    model.fit(
        dataset,
        epochs=epochs,
        steps_per_epoch=args.interval,
        shuffle=False,
        callbacks=[timer],
        verbose=0,
    )
    times = {
        "with": timer.times["with"],
        "without": timer.times["without"][1:],  # round 0 compiled
    }
    per_step = {
        k: [1e3 * t / args.interval for t in v] for k, v in times.items()
    }
    medians = {k: statistics.median(v) for k, v in per_step.items()}
    paired = statistics.median(
        a / b for a, b in zip(per_step["with"], per_step["without"])
    )
    result = {
        "config": dict(
            backend=keras.config.backend(),
            model="train.py default: llama d=64 L=2, MTP D=2",
            sequence_length=config.sequence_length,
            batch_size=config.batch_size,
            checkpoint_interval_steps=args.interval,
            rounds=args.rounds,
            parameters=model.count_params(),
        ),
        "ms_per_step": {
            k: [round(t, 2) for t in v] for k, v in per_step.items()
        },
        "median_ms_per_step": {k: round(v, 2) for k, v in medians.items()},
        "ratio_with_over_without": round(
            medians["with"] / medians["without"], 3
        ),
        "median_ratio_of_paired_rounds": round(paired, 3),
    }
    print("| checkpoints | median ms / step | min | max |\n|---|---|---|---|")
    for name, t in per_step.items():
        print(
            f"| {name} (every {args.interval} steps) | {medians[name]:.2f} "
            f"| {min(t):.2f} | {max(t):.2f} |"
        )
    print(
        f"\nratio with / without: {result['ratio_with_over_without']:.3f} "
        f"(median of paired rounds: {paired:.3f})\n"
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--interval",
        type=int,
        default=train.Config().eval_interval,
        help="steps between checkpoints (train.py's --eval-interval)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        main(args, os.path.join(tmp, "checkpoints"))
