"""What does one asynchronous Orbax checkpoint cost train.py? Measured per save.

    python benchmarks/bench_checkpoint.py          # ~6 min on 2 CPU cores
    python benchmarks/bench_checkpoint.py --saves=10 --out=x.json

One process, JAX backend. `train.py`'s default model (llama d=64, L=2, MTP
D=2, T=128, batch 16, bytes) is trained with `model.fit` on random tokens
(the input pipeline is measured by bench_input.py) in epochs of
`--epoch-steps` steps. Epoch boundaries alternate: at every other one a
`keras.callbacks.OrbaxCheckpoint` (asynchronous, as train.py writes it) is
saved, at the others nothing. Every step's wall time is recorded.

The cost of one save is measured where it happens, against the steps just
before it, because this machine's speed drifts by more than the effect
between epochs (whole-epoch ratios swung 0.99-1.11 in one run): for each
boundary, `excess = sum over the W steps after it of (step time - median of
the W steps before it)`. The boundary's step includes the blocking part of the
save, the steps after it the background write. `cost per save = median excess
at saving boundaries - median excess at the others` (an epoch boundary costs
something of its own), reported for W = 10, 25, 50 and 100 steps: equal figures
mean the write had finished within the window; the largest of the four is
taken as the cost (conservative: longer windows add more steps' noise). The
overhead at train.py's
default interval (a checkpoint every `--interval` steps, its
`--eval-interval`) is `cost per save / (interval * median step time)`.
Also reported: the time each save blocks `on_epoch_end`, and the whole-epoch
ratio (with / without) for comparison, which carries the drift.
"""

import argparse
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
import keras_mtp  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from keras_mtp import backbones  # noqa: E402
from keras_mtp import data  # noqa: E402

# train.py's defaults (its Config): the model, its optimizer and batches.
SEQUENCE_LENGTH = 128
BATCH_SIZE = 16
STEPS = 1200
EVAL_INTERVAL = 300

WINDOWS = (10, 25, 50, 100)


class SaveEveryOtherEpoch(keras.callbacks.Callback):
    """Saves at the end of odd epochs; records step end times and how long
    each save blocks."""

    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self.step_ends = []
        self.blocking_s = []

    def set_model(self, model):
        super().set_model(model)
        self.checkpoint.set_model(model)

    def on_train_batch_end(self, batch, logs=None):
        self.step_ends.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        if epoch % 2:
            start = time.perf_counter()
            self.checkpoint.on_epoch_end(epoch, logs)
            self.blocking_s.append(time.perf_counter() - start)

    def on_train_end(self, logs=None):
        self.checkpoint.on_train_end(logs)


def boundary_excess(step_ms, boundary, window):
    """Extra ms in the `window` steps from `boundary` on, against the median
    of the `window` steps before it."""
    before = np.median(step_ms[boundary - window : boundary])
    return float(np.sum(step_ms[boundary : boundary + window] - before))


def train_default_model(vocabulary_size):
    """train.py's default model and optimizer, built with the library."""
    backbone = backbones.build_backbone(
        "llama",
        vocabulary_size=vocabulary_size,
        hidden_dim=64,
        num_layers=2,
        num_heads=4,
        intermediate_dim=128,
        sequence_length=SEQUENCE_LENGTH,
    )
    model = keras_mtp.MTPCausalLM(
        backbone, mtp_num_layers=2, mtp_loss_scaling_factor=0.1
    )
    schedule = keras_mtp.callbacks.warmup_cosine(
        3e-3, STEPS, warmup_steps=30, min_learning_rate_ratio=0.1
    )
    model.compile(optimizer=keras.optimizers.Adam(schedule))
    return model


def measure(args, directory):
    keras.utils.set_random_seed(0)
    model = train_default_model(64 * -(-data.VOCABULARY_SIZE // 64))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, data.VOCABULARY_SIZE, 2_000_000).astype(np.uint16)
    dataset = data.make_dataset(tokens, SEQUENCE_LENGTH, BATCH_SIZE)
    timer = SaveEveryOtherEpoch(
        keras.callbacks.OrbaxCheckpoint(
            directory, save_freq="epoch", max_to_keep=2
        )
    )
    # Epoch 0 compiles; boundaries after epochs 1, 2, ... are measured.
    model.fit(
        dataset,
        epochs=2 * args.saves + 2,
        steps_per_epoch=args.epoch_steps,
        callbacks=[timer],
        verbose=0,
    )
    # step_ms[i] is step i's time, measured from the end of step i - 1, so a
    # boundary's epoch-end work lands in the first step after it.
    step_ms = 1e3 * np.diff(np.asarray(timer.step_ends))
    n = args.epoch_steps
    # Boundary after epoch e (e >= 1) is step index (e + 1) * n - 1 of diffs.
    boundaries = {"with": [], "without": []}
    for epoch in range(1, 2 * args.saves + 1):
        kind = "with" if epoch % 2 else "without"
        boundaries[kind].append((epoch + 1) * n - 1)
    median_step = float(np.median(step_ms[n:]))
    cost = {}
    for window in WINDOWS:
        excess = {
            kind: [boundary_excess(step_ms, b, window) for b in bs]
            for kind, bs in boundaries.items()
        }
        cost[window] = {
            "median_excess_ms": {
                k: round(statistics.median(v), 1) for k, v in excess.items()
            },
            "cost_per_save_ms": round(
                statistics.median(excess["with"])
                - statistics.median(excess["without"]),
                1,
            ),
        }
    epoch_ms = {kind: [] for kind in boundaries}  # the epoch after a boundary
    for kind, bs in boundaries.items():
        for b in bs:
            epoch_ms[kind].append(float(np.sum(step_ms[b : b + n])))
    # The largest window's sum is the noisiest: report the largest figure.
    per_save = max(c["cost_per_save_ms"] for c in cost.values())
    return {
        "config": dict(
            backend=keras.config.backend(),
            model="train.py default: llama d=64 L=2, MTP D=2",
            parameters=model.count_params(),
            sequence_length=SEQUENCE_LENGTH,
            batch_size=BATCH_SIZE,
            epoch_steps=n,
            saves=args.saves,
            checkpoint_interval_steps=args.interval,
        ),
        "median_ms_per_step": round(median_step, 2),
        "save_blocking_ms": [round(1e3 * s, 1) for s in timer.blocking_s],
        "by_window": {str(w): c for w, c in cost.items()},
        "cost_per_save_ms": per_save,
        "overhead_at_interval": round(
            per_save / (args.interval * median_step), 4
        ),
        "whole_epoch_ratio_with_over_without": round(
            statistics.median(epoch_ms["with"])
            / statistics.median(epoch_ms["without"]),
            3,
        ),
    }


def main(args, directory):
    absl.logging.set_verbosity(absl.logging.ERROR)
    result = measure(args, directory)
    result["machine"] = machine()
    print(
        "| window (steps after the boundary) | excess with save (ms) "
        "| excess without (ms) | cost per save (ms) |\n|---|---|---|---|"
    )
    for window, c in result["by_window"].items():
        e = c["median_excess_ms"]
        print(
            f"| {window} | {e['with']} | {e['without']} "
            f"| {c['cost_per_save_ms']} |"
        )
    print(
        f"\nmedian step {result['median_ms_per_step']} ms; a save blocks "
        f"{statistics.median(result['save_blocking_ms'])} ms (median); "
        f"overhead of a checkpoint every {args.interval} steps: "
        f"{100 * result['overhead_at_interval']:.2f} %; whole-epoch ratio "
        f"with / without {result['whole_epoch_ratio_with_over_without']}\n"
    )
    write_result(result, args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--interval",
        type=int,
        default=EVAL_INTERVAL,
        help="steps between train.py's checkpoints (its --eval-interval)",
    )
    parser.add_argument("--epoch-steps", type=int, default=200)
    parser.add_argument("--saves", type=int, default=6)
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args()
    if args.epoch_steps < 2 * max(WINDOWS):
        parser.error(f"--epoch-steps must be >= {2 * max(WINDOWS)}")
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        main(args, os.path.join(tmp, "checkpoints"))
