"""Does the input pipeline slow training down? Real batches vs in-memory.

    python benchmarks/bench_input.py                  # ~1.5 min on 2 CPU cores
    python benchmarks/bench_input.py --out=bench_input.json

One process, JAX backend. A small llama-like `MTPCausalLM` (d=64, L=2, D=2,
T=128, batch 16, byte vocabulary) is trained with `model.fit` for
`--steps` steps per round on

- real: `keras_mtp.data.make_dataset` over the Python standard library (the
  token file is prepared before timing; each round resumes where the last
  one stopped, `start_step`), and
- synthetic: the same number of batches of the same shapes and dtypes,
  already in memory as numpy arrays,

alternating real → synthetic → real → ... for `--rounds` rounds after a
warm-up of each that compiles the train step. It reports the median wall time
per step of each, their ratio (real / synthetic; 1.00 = the pipeline costs
nothing), and the time to produce one batch with no model at all, as a
markdown table and as JSON (to `--out` when given).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tf.data only: quiet

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_mtp  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from keras_mtp import data  # noqa: E402

SEQUENCE_LENGTH = 128
BATCH_SIZE = 16


def make_model():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=data.VOCABULARY_SIZE,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
    )
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def synthetic_batches(num_steps):
    """`num_steps` batches of random byte ids, as `fit`'s numpy arrays."""
    rng = np.random.default_rng(0)
    shape = (num_steps * BATCH_SIZE, SEQUENCE_LENGTH + 1)
    rows = rng.integers(2, data.VOCABULARY_SIZE, size=shape, dtype=np.int32)
    ones = np.ones((shape[0], SEQUENCE_LENGTH), np.int32)
    x = {"token_ids": rows[:, :-1], "padding_mask": ones}
    return x, rows[:, 1:], ones.astype(np.float32)


def seconds_per_step(fit, num_steps):
    start = time.perf_counter()
    fit()
    return (time.perf_counter() - start) / num_steps


def seconds_per_batch(dataset, num_batches):
    """The pipeline alone: produce and convert batches, no model."""
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        keras.tree.map_structure(np.asarray, next(iterator))
    return (time.perf_counter() - start) / num_batches


def main(args, cache_dir):
    files, _ = data.split_files(data.default_corpus_files())
    start = time.perf_counter()
    tokens = data.prepare_tokens(files, cache_dir)
    prepare_s = time.perf_counter() - start

    def real_dataset(round_index):
        return data.make_dataset(
            files,
            SEQUENCE_LENGTH,
            BATCH_SIZE,
            start_step=round_index * args.steps,
            cache_dir=cache_dir,
        )

    x, y, w = synthetic_batches(args.steps)
    model = make_model()
    # Both datasets are built before timing; `fit` keeps its compiled step.
    datasets = [real_dataset(r) for r in range(args.rounds + 1)]
    runs = {
        "real": lambda r: model.fit(
            datasets[r], steps_per_epoch=args.steps, shuffle=False, verbose=0
        ),
        "synthetic": lambda r: model.fit(
            x,
            y,
            sample_weight=w,
            batch_size=BATCH_SIZE,
            shuffle=False,
            verbose=0,
        ),
    }
    for name, run in runs.items():  # warm-up: compiles
        run(0)
    times = {name: [] for name in runs}
    for r in range(1, args.rounds + 1):
        for name, run in runs.items():
            times[name].append(seconds_per_step(lambda: run(r), args.steps))

    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "config": dict(
            backend=keras.config.backend(),
            model="llama d=64 L=2, MTP D=2",
            sequence_length=SEQUENCE_LENGTH,
            batch_size=BATCH_SIZE,
            steps_per_round=args.steps,
            rounds=args.rounds,
            corpus_files=len(files),
            corpus_tokens=int(len(tokens)),
            prepare_tokens_s=round(prepare_s, 3),
        ),
        "ms_per_step": {
            k: [round(1e3 * t, 2) for t in v] for k, v in times.items()
        },
        "median_ms_per_step": {
            k: round(1e3 * v, 2) for k, v in medians.items()
        },
        "ratio_real_over_synthetic": round(
            medians["real"] / medians["synthetic"], 3
        ),
        # Rounds run back to back, so one round's ratio sees the same load.
        "median_ratio_of_paired_rounds": round(
            statistics.median(
                a / b for a, b in zip(times["real"], times["synthetic"])
            ),
            3,
        ),
        "pipeline_only_ms_per_batch": round(
            1e3 * seconds_per_batch(real_dataset(0), 200), 3
        ),
    }
    print("| input | median ms / step | min | max |\n|---|---|---|---|")
    for name, t in times.items():
        print(
            f"| {name} | {1e3 * medians[name]:.2f} | {1e3 * min(t):.2f} "
            f"| {1e3 * max(t):.2f} |"
        )
    print(
        f"\nratio real / synthetic: {result['ratio_real_over_synthetic']:.3f}"
        f" (median of paired rounds: "
        f"{result['median_ratio_of_paired_rounds']:.3f})"
        f"; pipeline alone: {result['pipeline_only_ms_per_batch']:.3f} ms "
        f"per batch; prepare_tokens: {prepare_s:.2f} s for "
        f"{len(tokens):,} tokens\n"
    )
    result["machine"] = machine()
    write_result(result, args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20, help="per round")
    parser.add_argument(
        "--cache-dir", default=None, help="token files; default: a temp dir"
    )
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        main(args, args.cache_dir or tmp)
