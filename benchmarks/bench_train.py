"""What does each MTP depth cost a training step? Measured against the FLOP
model of `keras_mtp.flops`.

    python benchmarks/bench_train.py --out bench_train.json  # 6-9 min
    python benchmarks/bench_train.py --quick   # smoke run, < 1 min

(2-core CPU: the full run took 6 min 21 s alone, 8 min 32 s beside another
job; 2 min of it build and compile. `--reference` about doubles the timing.)

One process, JAX backend. A keras-hub `GPT2Backbone` (d=256, 4 layers, 4
heads, FFN 1024, T=256, batch 8, no dropout) is wrapped in `MTPCausalLM` with
`mtp_num_layers` D in `--depths` (0 = the plain causal LM) for each vocabulary
size in `--vocab`: one config per (V, D). Every config is built, compiled and
warmed up first; then the configs are timed in alternating order (forward on
even rounds, backward on odd ones) for `--rounds` rounds of `--steps`
`train_on_batch` steps each on one fixed random batch. `train_on_batch`
returns numpy logs, so every step is complete when it returns.

Machines here are shared and noisy, so it reports medians over rounds of the
process CPU time (`time.process_time`, all threads) and of the wall time per
step, and their ratios to D=0 at the same V, next to the FLOP model's
predicted ratio `1 + overhead(D)`. It also reports XLA's temp memory of the
compiled train step (deterministic: `memory_analysis()` of the same
`jax.jit(model.train_step)` the Keras trainer runs: forward, backward, Adam).

`--chunk N` passes `loss_chunk_size=N` to `MTPCausalLM` (every D) when the
installed version takes it. `--compare-chunk N [N ...]` times, for every
(V, D), the dense model next to one with `loss_chunk_size=N` for each N, all
in the same alternating rounds, and reports chunked / dense per (V, D, N)
(median of paired rounds):

    python benchmarks/bench_train.py --vocab 32768 --depths 0 2 \
        --compare-chunk 128 256 --out chunk.json

`--compare-packing` times, at each length of `--packing-lengths` (default
256 and 1024, the batch shrunk to keep 2048 tokens a step), the step on
unpacked rows (no `segment_ids`: the backbone's own call, today's compiled
step) next to the step on packed rows (about four documents a row, the
segment mask in every attention and positions restarted per document), in
the same alternating rounds, and reports packed / unpacked (median of
paired rounds); `--vocab` defaults to 256 and `--depths` to 1 there:

    nice python benchmarks/bench_train.py --compare-packing \
        --out benchmarks/results/bench_packing_<date>_cpu.json

`--reference` also times the plain JAX + optax
model of `benchmarks/reference_jax.py` (same configs, weights, batch and
Adam), interleaved with the Keras steps, and reports keras_mtp / plain JAX.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import inspect
import itertools
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_mtp  # noqa: E402
from keras_mtp import flops  # noqa: E402

REFERENCE_PATH = os.path.join(os.path.dirname(__file__), "reference_jax.py")
LEARNING_RATE = 1e-4


@dataclasses.dataclass(frozen=True)
class Sizes:
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 256
    intermediate_dim: int = 1024
    sequence_length: int = 256
    batch_size: int = 8


FULL = Sizes()
QUICK = Sizes(
    num_layers=2,
    num_heads=2,
    hidden_dim=32,
    intermediate_dim=64,
    sequence_length=32,
    batch_size=2,
)


def chunk_supported():
    """Whether the installed `MTPCausalLM` takes `loss_chunk_size`."""
    parameters = inspect.signature(keras_mtp.MTPCausalLM.__init__).parameters
    return "loss_chunk_size" in parameters


def make_model(sizes, vocab, depth, chunk=None):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocab,
        num_layers=sizes.num_layers,
        num_heads=sizes.num_heads,
        hidden_dim=sizes.hidden_dim,
        intermediate_dim=sizes.intermediate_dim,
        max_sequence_length=sizes.sequence_length,
        dropout=0.0,
    )
    kwargs = {}
    if chunk is not None:
        kwargs["loss_chunk_size"] = chunk
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=depth, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE))
    return model


def make_batch(sizes, vocab, seed=0):
    """One fixed random batch `(x, y, sample_weight)`, all real tokens."""
    rng = np.random.default_rng(seed)
    shape = (sizes.batch_size, sizes.sequence_length + 1)
    rows = rng.integers(1, vocab, size=shape, dtype=np.int32)
    ones = np.ones((sizes.batch_size, sizes.sequence_length), np.int32)
    x = {"token_ids": rows[:, :-1], "padding_mask": ones}
    return x, rows[:, 1:], ones.astype(np.float32)


def make_packed_batch(sizes, vocab, seed=0, documents=4):
    """`make_batch` with each row cut into `documents` documents at random
    places (`segment_ids` 1, 2, ...), no loss weight across a cut."""
    x, y, w = make_batch(sizes, vocab, seed)
    rng = np.random.default_rng(seed + 1)
    length = sizes.sequence_length
    segments = np.zeros((sizes.batch_size, length), np.int32)
    for row in range(sizes.batch_size):
        cuts = np.sort(
            rng.choice(np.arange(1, length), documents - 1, replace=False)
        )
        segments[row] = 1 + np.searchsorted(cuts, np.arange(length), "right")
    following = np.roll(segments, -1, axis=1)
    following[:, -1] = 0
    x = {**x, "segment_ids": segments}
    return x, y, w * (segments == following)


def train_step_temp_bytes(model, batch):
    """XLA's temp buffer bytes of the compiled Keras train step.

    The same function the JAX trainer jits (`model.train_step`, state donated)
    on the model's current state; deterministic for a given XLA version.
    """
    import jax

    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    data = keras.tree.map_structure(jax.numpy.asarray, batch)
    step = jax.jit(model.train_step, donate_argnums=0)
    analysis = step.lower(state, data).compile().memory_analysis()
    if analysis is None:  # some backends do not report it
        return None
    return int(analysis.temp_size_in_bytes)


def time_steps(step, num_steps):
    """`(wall, cpu)` seconds per step over `num_steps` calls of `step()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_steps):
        step()
    return (
        (time.perf_counter() - wall) / num_steps,
        (time.process_time() - cpu) / num_steps,
    )


def load_reference():
    """`benchmarks/reference_jax.py` as a module, or None when absent."""
    if not os.path.exists(REFERENCE_PATH):
        return None
    spec = importlib.util.spec_from_file_location(
        "reference_jax", REFERENCE_PATH
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_step(reference, model, batch):
    """`(step, temp_bytes)` of the plain JAX + optax train step on the same
    weights and batch as `model`; `step()` runs one step and blocks.

    `benchmarks/reference_jax.py`'s API: `config_from_keras`,
    `params_from_keras`, `make_batch` and `make_train_step(config, optimizer)`
    with `optax.adam` at Keras Adam's defaults (ε = 1e-7).
    """
    import jax
    import optax

    config = reference.config_from_keras(model)
    params = reference.params_from_keras(model)
    data = reference.make_batch(*batch)
    optimizer = optax.adam(LEARNING_RATE, eps=1e-7)
    train_step = reference.make_train_step(config, optimizer)
    state = [params, optimizer.init(params)]
    compiled = train_step.lower(state[0], state[1], data).compile()
    analysis = compiled.memory_analysis()
    temp = None if analysis is None else int(analysis.temp_size_in_bytes)

    def step():
        state[0], state[1], metrics = train_step(state[0], state[1], data)
        jax.block_until_ready(metrics)

    return step, temp


def median_ratio(a, b):
    """Median over rounds of `a[r] / b[r]`: each pair ran back to back."""
    return statistics.median(x / y for x, y in zip(a, b))


def build_configs(args, sizes, chunks, reference):
    """One model per (V, D, chunk), built, compiled and warmed up before any
    timing, with its step function (and the reference's, if any)."""
    configs = []  # built, compiled and warmed up before any timing
    for vocab in args.vocab:
        batch = make_batch(sizes, vocab)
        for depth, size in itertools.product(args.depths, chunks):
            name = f"V={vocab} D={depth}"
            if args.compare_chunk:
                name += f" chunk={size or '-'}"
            model = make_model(sizes, vocab, depth, size)
            x, y, w = batch
            t = time.perf_counter()
            for _ in range(args.warmup):  # the first call compiles
                model.train_on_batch(x, y, sample_weight=w)
            compile_s = time.perf_counter() - t
            config = dict(
                name=name,
                vocab=vocab,
                depth=depth,
                chunk=size,
                step=lambda m=model, b=batch: m.train_on_batch(
                    b[0], b[1], sample_weight=b[2]
                ),
                warmup_s=compile_s,
                temp_bytes=train_step_temp_bytes(model, batch),
                params=model.count_params(),
            )
            if reference is not None:
                config["reference_step"], config["reference_temp"] = (
                    reference_step(reference, model, batch)
                )
                for _ in range(args.warmup):
                    config["reference_step"]()
            configs.append(config)
            print(
                f"built {name}: {config['params']:,} params, warm-up "
                f"{compile_s:.1f} s",
                file=sys.stderr,
            )
    return configs


def build_packing_configs(args, sizes):
    """Per (length, V, D): the model on unpacked rows and a twin on packed
    rows, built, compiled and warmed up before any timing."""
    configs = []
    tokens = sizes.batch_size * sizes.sequence_length
    for length, vocab, depth in itertools.product(
        args.packing_lengths, args.vocab, args.depths
    ):
        shape = dataclasses.replace(
            sizes, sequence_length=length, batch_size=max(1, tokens // length)
        )
        for packed in (False, True):
            name = f"T={length} V={vocab} D={depth} " + (
                "packed" if packed else "unpacked"
            )
            model = make_model(shape, vocab, depth)
            batch = (make_packed_batch if packed else make_batch)(shape, vocab)
            t = time.perf_counter()
            for _ in range(args.warmup):  # the first call compiles
                model.train_on_batch(batch[0], batch[1], sample_weight=batch[2])
            configs.append(
                dict(
                    name=name,
                    length=length,
                    batch_size=shape.batch_size,
                    vocab=vocab,
                    depth=depth,
                    packed=packed,
                    step=lambda m=model, b=batch: m.train_on_batch(
                        b[0], b[1], sample_weight=b[2]
                    ),
                    warmup_s=time.perf_counter() - t,
                    temp_bytes=train_step_temp_bytes(model, batch),
                )
            )
            print(f"built {name}", file=sys.stderr)
    return configs


def summarize_packing(configs):
    """One row per (length, V, D): unpacked and packed medians and the
    packed / unpacked ratios (median of paired rounds)."""
    rows = []
    for plain, packed in zip(configs[::2], configs[1::2]):
        row = dict(
            sequence_length=plain["length"],
            batch_size=plain["batch_size"],
            vocab=plain["vocab"],
            depth=plain["depth"],
        )
        for key, c in (("unpacked", plain), ("packed", packed)):
            row[f"{key}_median_cpu_ms"] = 1e3 * statistics.median(c["step_cpu"])
            row[f"{key}_median_wall_ms"] = 1e3 * statistics.median(
                c["step_wall"]
            )
            row[f"{key}_cpu_ms_per_round"] = [1e3 * v for v in c["step_cpu"]]
            row[f"{key}_temp_mib"] = (
                None if c["temp_bytes"] is None else c["temp_bytes"] / 2**20
            )
        row["packed_over_unpacked_cpu"] = median_ratio(
            packed["step_cpu"], plain["step_cpu"]
        )
        row["packed_over_unpacked_wall"] = median_ratio(
            packed["step_wall"], plain["step_wall"]
        )
        rows.append(row)
    return rows


def packing_markdown(result):
    """`--compare-packing`: packed / unpacked step time per length."""
    header = (
        "| T | batch | V | D | unpacked CPU ms/step | packed CPU ms/step "
        "| packed / unpacked (CPU) | (wall) | temp MiB unpacked, packed |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['sequence_length']} | {r['batch_size']} | {r['vocab']} "
            f"| {r['depth']} | {r['unpacked_median_cpu_ms']:.1f} "
            f"| {r['packed_median_cpu_ms']:.1f} "
            f"| {r['packed_over_unpacked_cpu']:.3f} "
            f"| {r['packed_over_unpacked_wall']:.3f} "
            f"| {_fmt(r['unpacked_temp_mib'], '.1f')}, "
            f"{_fmt(r['packed_temp_mib'], '.1f')} |"
        )
    return "\n".join(lines)


def time_rounds(args, configs, reference):
    """Appends each round's wall and CPU time per step to every config."""
    runs = [(c, "step") for c in configs]
    if reference is not None:
        runs += [(c, "reference_step") for c in configs]
    for c, key in runs:
        c[key + "_wall"], c[key + "_cpu"] = [], []
    for r in range(args.rounds):
        # Alternate the order so that drift in machine load hits every
        # config alike: forward on even rounds, backward on odd ones.
        for c, key in runs if r % 2 == 0 else runs[::-1]:
            wall, cpu = time_steps(c[key], args.steps)
            c[key + "_wall"].append(wall)
            c[key + "_cpu"].append(cpu)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)


def summarize(args, sizes, configs, reference):
    """One row of medians and paired ratios per config."""
    tokens = sizes.batch_size * sizes.sequence_length
    base = {(c["vocab"], c["chunk"]): c for c in configs if c["depth"] == 0}
    dense = {(c["vocab"], c["depth"]): c for c in configs if not c["chunk"]}
    rows = []
    for c in configs:
        predicted = flops.predicted_step_ratio(
            d=sizes.hidden_dim,
            f=sizes.intermediate_dim,
            T=sizes.sequence_length,
            V=c["vocab"],
            L=sizes.num_layers,
            D=c["depth"],
        )
        wall = statistics.median(c["step_wall"])
        cpu = statistics.median(c["step_cpu"])
        row = dict(
            config=c["name"],
            vocab=c["vocab"],
            depth=c["depth"],
            loss_chunk_size=c["chunk"],
            params=c["params"],
            median_wall_ms=1e3 * wall,
            median_cpu_ms=1e3 * cpu,
            tokens_per_s=tokens / wall,
            wall_ms_per_round=[1e3 * v for v in c["step_wall"]],
            cpu_ms_per_round=[1e3 * v for v in c["step_cpu"]],
            predicted_ratio=predicted,
            train_step_temp_mib=(
                None if c["temp_bytes"] is None else c["temp_bytes"] / 2**20
            ),
            warmup_s=c["warmup_s"],
        )
        b = base.get((c["vocab"], c["chunk"]))
        if b is not None:
            row["cpu_ratio"] = median_ratio(c["step_cpu"], b["step_cpu"])
            row["wall_ratio"] = median_ratio(c["step_wall"], b["step_wall"])
            row["cpu_ratio_over_predicted"] = row["cpu_ratio"] / predicted
        b = dense.get((c["vocab"], c["depth"]))
        if args.compare_chunk and c["chunk"] and b is not None:
            row["chunk_over_dense_cpu"] = median_ratio(
                c["step_cpu"], b["step_cpu"]
            )
            row["chunk_over_dense_wall"] = median_ratio(
                c["step_wall"], b["step_wall"]
            )
        if reference is not None:
            row["reference_median_cpu_ms"] = 1e3 * statistics.median(
                c["reference_step_cpu"]
            )
            row["reference_median_wall_ms"] = 1e3 * statistics.median(
                c["reference_step_wall"]
            )
            row["reference_temp_mib"] = (
                None
                if c["reference_temp"] is None
                else c["reference_temp"] / 2**20
            )
            row["keras_over_reference_cpu"] = median_ratio(
                c["step_cpu"], c["reference_step_cpu"]
            )
        rows.append(row)
    return rows


def run(args):
    if keras.config.backend() != "jax":
        sys.exit(
            f"bench_train.py needs KERAS_BACKEND=jax, not "
            f"{keras.config.backend()}"
        )
    sizes = QUICK if args.quick else FULL
    chunk = args.chunk
    if chunk is not None and not chunk_supported():
        print(
            "warning: this MTPCausalLM has no `loss_chunk_size`; "
            "--chunk ignored",
            file=sys.stderr,
        )
        chunk = None
    chunks = [chunk]  # loss_chunk_size of each model built per (V, D)
    if args.compare_chunk:
        if not chunk_supported():
            sys.exit("--compare-chunk: this MTPCausalLM has no chunked loss")
        chunks = [None] + list(args.compare_chunk)
    reference = None
    if args.reference:
        reference = load_reference()
        if reference is None:
            sys.exit(f"--reference: {REFERENCE_PATH} does not exist")

    start = time.perf_counter()
    if args.compare_packing:
        configs = build_packing_configs(args, sizes)
    else:
        configs = build_configs(args, sizes, chunks, reference)
    setup_s = time.perf_counter() - start
    t = time.perf_counter()
    time_rounds(args, configs, reference)
    timing_s = time.perf_counter() - t
    if args.compare_packing:
        rows = summarize_packing(configs)
    else:
        rows = summarize(args, sizes, configs, reference)

    result = dict(
        config=dict(
            backend=keras.config.backend(),
            model="GPT2Backbone",
            **dataclasses.asdict(sizes),
            vocab=list(args.vocab),
            depths=list(args.depths),
            rounds=args.rounds,
            steps_per_round=args.steps,
            warmup_steps=args.warmup,
            optimizer=f"Adam({LEARNING_RATE})",
            loss_chunk_size=chunk,
            compare_chunk=args.compare_chunk,
            compare_packing=args.compare_packing,
            packing_lengths=(
                list(args.packing_lengths) if args.compare_packing else None
            ),
            reference=reference is not None,
            quick=args.quick,
        ),
        machine=dict(
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            platform=platform.platform(),
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            python=platform.python_version(),
            keras=keras.__version__,
            keras_hub=keras_hub.__version__,
            jax=_jax_version(),
        ),
        setup_s=setup_s,
        timing_s=timing_s,
        rows=rows,
    )
    return result


def _jax_version():
    import jax

    return jax.__version__


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def markdown(result):
    """The results as a markdown table, one row per config."""
    reference = result["config"]["reference"]
    header = (
        "| config | wall ms/step | CPU ms/step | tokens/s | CPU ratio "
        "| wall ratio | predicted | CPU / predicted | step temp MiB |"
    )
    if reference:
        header += (
            " plain JAX CPU ms/step | keras_mtp / plain JAX (CPU) "
            "| plain JAX temp MiB |"
        )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in result["rows"]:
        line = (
            f"| {r['config']} | {r['median_wall_ms']:.1f} "
            f"| {r['median_cpu_ms']:.1f} | {r['tokens_per_s']:,.0f} "
            f"| {_fmt(r.get('cpu_ratio'), '.3f')} "
            f"| {_fmt(r.get('wall_ratio'), '.3f')} "
            f"| {r['predicted_ratio']:.3f} "
            f"| {_fmt(r.get('cpu_ratio_over_predicted'), '.3f')} "
            f"| {_fmt(r['train_step_temp_mib'], '.1f')} |"
        )
        if reference:
            line += (
                f" {r['reference_median_cpu_ms']:.1f} "
                f"| {r['keras_over_reference_cpu']:.3f} "
                f"| {_fmt(r['reference_temp_mib'], '.1f')} |"
            )
        lines.append(line)
    return "\n".join(lines)


def chunk_markdown(result):
    """`--compare-chunk`: chunked / dense step time per (V, D) and chunk."""
    sizes = result["config"]["compare_chunk"]
    header = "| V | D | dense CPU ms/step |" + "".join(
        f" chunk={n} CPU ms | chunk={n} / dense (CPU) | (wall) |" for n in sizes
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    rows = {
        (r["vocab"], r["depth"], r["loss_chunk_size"]): r
        for r in result["rows"]
    }
    for r in result["rows"]:
        if r["loss_chunk_size"]:
            continue
        line = f"| {r['vocab']} | {r['depth']} | {r['median_cpu_ms']:.0f} |"
        for n in sizes:
            c = rows[r["vocab"], r["depth"], n]
            line += (
                f" {c['median_cpu_ms']:.0f} "
                f"| {c['chunk_over_dense_cpu']:.3f} "
                f"| {c['chunk_over_dense_wall']:.3f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="per round")
    parser.add_argument("--warmup", type=int, default=2, help="steps")
    parser.add_argument("--vocab", type=int, nargs="+", default=None)
    parser.add_argument("--depths", type=int, nargs="+", default=None)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke run"
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="loss_chunk_size, if this MTPCausalLM takes it",
    )
    parser.add_argument(
        "--compare-chunk",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="time dense and loss_chunk_size=N models side by side",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time benchmarks/reference_jax.py (plain JAX + optax)",
    )
    parser.add_argument(
        "--compare-packing",
        action="store_true",
        help="time unpacked and packed rows (segment_ids) side by side",
    )
    parser.add_argument(
        "--packing-lengths",
        type=int,
        nargs="+",
        default=None,
        metavar="T",
        help="--compare-packing's sequence lengths (default 256 1024)",
    )
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    if args.compare_packing:
        if args.compare_chunk or args.reference or args.chunk is not None:
            parser.error(
                "--compare-packing times the dense GPT-2 alone: no --chunk, "
                "--compare-chunk or --reference"
            )
        if args.packing_lengths is None:
            args.packing_lengths = [32, 64] if args.quick else [256, 1024]
        args.vocab = args.vocab or [256]
        args.depths = args.depths or [1]
    if args.vocab is None:
        args.vocab = [64, 512] if args.quick else [256, 32768]
    if args.depths is None:
        args.depths = [0, 1] if args.quick else [0, 1, 2, 4]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 6
    if args.steps is None:
        args.steps = 2
    if 0 not in args.depths and not args.compare_packing:
        parser.error("--depths must include 0: ratios are to D=0")
    if args.compare_chunk and args.chunk is not None:
        parser.error("--chunk and --compare-chunk exclude each other")

    result = run(args)
    c = result["config"]
    m = result["machine"]
    print(
        f"\nGPT2Backbone d={c['hidden_dim']} L={c['num_layers']} "
        f"f={c['intermediate_dim']} T={c['sequence_length']} "
        f"batch={c['batch_size']}, {c['optimizer']}, "
        f"loss_chunk_size={c['loss_chunk_size']}; medians of "
        f"{c['rounds']} rounds x {c['steps_per_round']} steps; ratios to "
        + (
            "unpacked rows (T and batch per row below)"
            if args.compare_packing
            else "D=0 at the same V"
        )
        + " (median of paired rounds)\n"
        f"{m['date']}, {m['processor']}, {m['cpu_count']} CPUs, JAX "
        f"{m['jax']}, keras {m['keras']}, keras-hub {m['keras_hub']}\n"
    )
    if args.compare_packing:
        print(packing_markdown(result))
    else:
        print(markdown(result))
    if args.compare_chunk:
        print("\nchunked / dense (median of paired rounds)\n")
        print(chunk_markdown(result))
    print(
        f"\nsetup (build, compile, warm-up, memory analysis): "
        f"{result['setup_s']:.0f} s; timing: {result['timing_s']:.0f} s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
