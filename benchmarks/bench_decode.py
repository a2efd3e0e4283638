"""Does decoding with the MTP heads as drafters pay, in wall-clock time?

    python benchmarks/bench_decode.py          # ~40 min on 2 busy CPU cores
    python benchmarks/bench_decode.py --quick  # untrained tiny model

The model is one where speculation is supposed to pay: batch 1 and a trunk
that dominates its depths (llama, d=512, L=8, byte vocabulary, 3 MTP depths,
each one block). `train.py` trains it with MTP on the built-in code corpus
(the Python standard library) into `<runs-dir>/trunk` (a temp directory by
default, never the repository), or reuses its `model.keras` if it is there.
Models with D = 1, 2, 3 drafting depths share its trunk and first D depths.

Then, in this one process (JAX backend), for each D, it decodes held-out
prompts (rows of the run's validation files) one at a time, plain (keras-hub's
`CausalLM.generate`, KV cache) and speculative (`MTPCausalLM.generate`),
alternating the two prompt by prompt for `--rounds` rounds after a warm-up
that compiles both, so both see the same machine load; the greedy outputs are
checked to be identical. It reports tokens per main forward pass, the
acceptance of each depth, ms per plain step and per speculative step (one
main forward each) and the wall-clock speed-up (median over rounds of the
paired ratios, with the spread of the rounds as the noise).

Also: the same with a stochastic sampler (`--sampler`), where `generate`
takes one; tokens per forward at `--batch-sizes`; the cost of each piece of a
speculative step, timed inside compiled loops (`cost_breakdown`); untrained
trunks of `--sweep-layers` depths, where only the step costs are measured;
and a memory-bound accelerator's speed-up *modelled* from weight bytes read
per step (labelled as a model, not a measurement). A markdown table, JSON
(`--out`) and a plot (`--plot`).
"""

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout, installed or not

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_mtp  # noqa: E402
from keras_mtp import backbones  # noqa: E402
from keras_mtp import data  # noqa: E402

# The trunk-dominated model and its training (train.py flags): 22 min on 2
# CPU cores shared with other jobs. Its greedy output on code loops, which
# makes it easy to draft (see distinct_4gram_share).
TRUNK = dict(
    hidden_dim=512,
    num_layers=8,
    num_heads=8,
    intermediate_dim=1024,
    mtp_num_layers=3,
    mtp_loss_scaling_factor=0.3,
    steps=160,
    eval_interval=40,
    eval_steps=2,
    warmup_steps=16,
    sequence_length=64,
    batch_size=8,
    learning_rate=0.002,
)
# --quick: an untrained tiny model (a smoke run of every code path).
QUICK_TRUNK = dict(
    hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64
)


# === Models ==================================================================


def train(run_dir, config):
    """Runs (or finishes) `train.py` with `config` into `run_dir`, unless
    its final `model.keras` is there already; returns that file's path."""
    path = os.path.join(run_dir, "model.keras")
    if os.path.exists(path):
        return path
    command = [sys.executable, os.path.join(ROOT, "train.py")]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in config.items()]
    command.append(f"--output-dir={run_dir}")
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return path


def untrained_model(config, vocabulary_size=320, mtp_num_layers=3, seed=0):
    """A llama `MTPCausalLM` of `config` with initial weights."""
    keras.utils.set_random_seed(seed)
    backbone = keras_mtp.backbones.build_backbone(
        "llama",
        vocabulary_size=vocabulary_size,
        num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        hidden_dim=config["hidden_dim"],
        intermediate_dim=config["intermediate_dim"],
        sequence_length=1024,
    )
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=mtp_num_layers)
    model(
        {
            "token_ids": np.zeros((1, 8), "int32"),
            "padding_mask": np.ones((1, 8), "int32"),
        }
    )
    return model


def with_depths(model, depth):
    """An `MTPCausalLM` on `model`'s backbone (shared) drafting with its
    first `depth` MTP depths (weights copied)."""
    if depth == model.mtp_num_layers:
        return model
    sub = keras_mtp.MTPCausalLM(model.backbone, mtp_num_layers=depth)
    sub(
        {
            "token_ids": np.zeros((1, 8), "int32"),
            "padding_mask": np.ones((1, 8), "int32"),
        }
    )
    for mine, trained in zip(
        sub.mtp_block.mtp_layers, model.mtp_block.mtp_layers
    ):
        mine.set_weights(trained.get_weights())
    return sub


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


def parameter_counts(model):
    """Weights read per token: the trunk's (its token embedding as the
    `d·V` head, read whole; the lookup reads one row) and one depth's."""
    trunk = model.backbone.count_params()
    depth = model.mtp_block.mtp_layers[0].count_params()
    return {"trunk": int(trunk), "depth": int(depth)}


# === Timing ==================================================================


def quantiles(values):
    """`(median, q1, q3)` of `values`: the spread of rounds is the noise."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def distinct_share(rows, n=4):
    """Share of the generated n-grams that are distinct, per row, averaged:
    near 0 when greedy decoding loops (where drafting is easy)."""
    shares = []
    for row in rows:
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        shares.append(len(set(grams)) / max(len(grams), 1))
    return float(np.mean(shares))


def decode(model, prompts, max_length, rounds, sampler=None):
    """Plain and speculative decoding of each prompt (a batch of rows each),
    alternating; greedy outputs are checked equal. Per-round seconds of
    each mode, main forward passes and acceptance."""
    kwargs = {}
    if "sampler" in inspect.signature(model.generate).parameters:
        # One instance for every call, as a user holds one (keras-hub
        # recompiles its generate function for a sampler of new settings).
        kwargs["sampler"] = keras_hub.samplers.get(sampler or "greedy")

    def run(prompt, speculative):
        start = time.perf_counter()
        outputs, stats = model.generate(
            prompt,
            max_length=max_length,
            speculative=speculative,
            return_stats=True,
            **kwargs,
        )
        return time.perf_counter() - start, outputs, stats

    for speculative in (False, True):  # compile both
        run(prompts[0], speculative)
    seconds = {False: [], True: []}
    passes = {False: 0, True: 0}
    positions, acceptance, generated = 0, [], []
    for r in range(rounds):
        elapsed = {False: 0.0, True: 0.0}
        for i, prompt in enumerate(prompts):
            # Which mode goes first alternates too (caches, clock boost).
            order = (False, True) if (r + i) % 2 == 0 else (True, False)
            outputs = {}
            for speculative in order:
                took, outputs[speculative], stats = run(prompt, speculative)
                elapsed[speculative] += took
                passes[speculative] += stats["forward_passes"]
                if speculative:
                    positions += stats["tokens_per_forward"] * max(
                        stats["forward_passes"], 1
                    )
                    acceptance.append(stats["acceptance"])
            if sampler is None:
                np.testing.assert_array_equal(
                    outputs[True]["token_ids"], outputs[False]["token_ids"]
                )
            generated += list(outputs[True]["token_ids"][:, prompt.shape[1] :])
        for speculative in (False, True):
            seconds[speculative].append(elapsed[speculative])
    ratios = [p / s for p, s in zip(seconds[False], seconds[True])]
    speedup, q1, q3 = quantiles(ratios)
    return {
        "tokens_per_forward": positions / max(passes[True], 1),
        "acceptance": np.mean(acceptance, axis=0).round(4).tolist(),
        "distinct_4gram_share": distinct_share(generated),
        "plain_ms_per_step": 1e3 * sum(seconds[False]) / passes[False],
        "speculative_ms_per_step": 1e3 * sum(seconds[True]) / passes[True],
        "speedup": speedup,
        "speedup_q1": q1,
        "speedup_q3": q3,
        "speedup_per_round": [round(x, 4) for x in ratios],
        "plain_s_per_round": [round(s, 4) for s in seconds[False]],
        "speculative_s_per_round": [round(s, 4) for s in seconds[True]],
    }


def tokens_per_forward(model, prompts, max_length, batch_size):
    """Positions filled per main forward pass, batches of `batch_size`."""
    positions = passes = 0
    for start in range(0, len(prompts) - batch_size + 1, batch_size):
        _, stats = model.generate(
            prompts[start : start + batch_size],
            max_length=max_length,
            speculative=True,
            return_stats=True,
        )
        positions += stats["tokens_per_forward"] * stats["forward_passes"]
        passes += stats["forward_passes"]
    return positions / max(passes, 1)


def cost_breakdown(model, prompt_length, max_length, rounds, steps=32):
    """ms per piece of a speculative step at batch 1, each piece run `steps`
    times inside one compiled loop (no dispatch cost), pieces alternating:
    the main model over windows of 1 .. D + 1 tokens against its cache
    (a plain step is the 1-token window), and one depth over a window of
    D + 1 tokens with its head and argmax at one position; and the main
    model's prefill of all positions (once per call)."""
    import jax

    depth = model.mtp_num_layers
    task = backbones.causal_lm(model.backbone)
    variables = model.trainable_variables + model.non_trainable_variables
    values = [v.value for v in variables]
    embedding = model.backbone.token_embedding
    layer = model.mtp_block.mtp_layers[0]
    scale = model.mtp_block.embedding_scale
    tokens = np.ones((1, max_length + depth), "int32")

    def compiled(fn):
        @jax.jit
        def run(values, *args):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                return fn(*args)

        return lambda *args: run(values, *args)

    prefill = compiled(
        lambda t: backbones.prefill(task, t, ops.ones_like(t, "bool"))
    )
    _, cache = prefill(tokens)

    def main_pass(window):
        def body(i, carry):
            cache, ids = carry
            logits, _, cache = backbones.call_with_cache(
                task, ids, cache, prompt_length + i
            )
            return cache, ops.cast(ops.argmax(logits, axis=-1), "int32")

        fn = compiled(lambda c, ids: ops.fori_loop(0, steps, body, (c, ids))[1])
        return lambda: fn(cache, tokens[:, :window])

    depth_cache = ops.zeros_like(
        backbones.layer_cache(model.backbone, cache, 0)
    )
    hidden = np.ones((1, depth + 1, model.backbone.hidden_dim), "float32")

    def depth_pass():
        def body(i, carry):
            cache, ids = carry
            _, normed, cache = layer.call_with_cache(
                hidden,
                backbones.embed(embedding, ids, scale=scale),
                cache,
                prompt_length + i,
            )
            logits = embedding(ops.take(normed, 0, axis=1), reverse=True)
            draft = ops.cast(ops.argmax(logits, axis=-1), "int32")
            return cache, ops.maximum(ids, draft[:, None])

        fn = compiled(lambda c, ids: ops.fori_loop(0, steps, body, (c, ids))[1])
        return lambda: fn(depth_cache, tokens[:, : depth + 1])

    pieces = {
        f"main_window_{w}": (main_pass(w), steps) for w in range(1, depth + 2)
    }
    pieces[f"depth_window_{depth + 1}"] = (depth_pass(), steps)
    # Once per `generate` call: keras-hub prefills all `max_length` (+ D)
    # positions, and so do the depths in the speculative prefill.
    pieces["main_prefill_once"] = (lambda: prefill(tokens), 1)
    for fn, _ in pieces.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in pieces}
    for _ in range(rounds):
        for name, (fn, repeats) in pieces.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(1e3 * (time.perf_counter() - start) / repeats)
    return {name: quantiles(t) for name, t in times.items()}


def modelled_accelerator_speedup(params, depth, tokens_per_forward):
    """A MODEL, not a measurement: memory-bound decoding at batch 1, where a
    step's time is the weight bytes it reads and a window of D + 1 tokens
    costs what one does. A speculative step reads the trunk and D depths
    (each its block, projection and the shared head again)."""
    cost = 1 + depth * params["depth"] / params["trunk"]
    return tokens_per_forward / cost


# === Report ==================================================================


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = report["depths"]
    x = [r["depth"] for r in rows]
    left.bar(
        [d - 0.2 for d in x],
        [r["speedup"] for r in rows],
        width=0.4,
        yerr=[
            [r["speedup"] - r["speedup_q1"] for r in rows],
            [r["speedup_q3"] - r["speedup"] for r in rows],
        ],
        label="measured wall-clock speed-up (CPU)",
    )
    left.bar(
        [d + 0.2 for d in x],
        [r["tokens_per_forward"] for r in rows],
        width=0.4,
        label="tokens per main forward",
    )
    left.axhline(1.0, color="gray", lw=0.8)
    left.set_xlabel("drafting depths D")
    left.set_xticks(x)
    left.set_title(report["config"]["model"], fontsize=8)
    left.legend(fontsize=7)
    sweep = report["layer_sweep"]
    layers = [r["num_layers"] for r in sweep]
    right.plot(layers, [r["plain_ms_per_step"] for r in sweep], "o-")
    right.plot(layers, [r["speculative_ms_per_step"] for r in sweep], "s-")
    right.set_xlabel("trunk layers L (untrained, d as above, D=1)")
    right.set_ylabel("ms per step")
    right.legend(["plain step", "speculative step (D=1)"], fontsize=7)
    twin = right.twinx()
    twin.plot(layers, [r["modelled_cpu_speedup"] for r in sweep], "k--", lw=0.8)
    twin.set_ylabel("step-cost ratio x measured tokens/forward (model)")
    figure.suptitle(
        f"bench_decode {report['machine']['date']}, "
        f"{report['machine']['cpu_count']} CPU cores, JAX, batch 1, greedy",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def print_table(report):
    print(
        "\n| D | tokens / forward | acceptance per depth | ms / plain step |"
        " ms / speculative step | speed-up (median [q1, q3]) |"
        " accelerator speed-up (model) |\n|---|---|---|---|---|---|---|"
    )
    for r in report["depths"]:
        print(
            f"| {r['depth']} | {r['tokens_per_forward']:.2f} | "
            + ", ".join(f"{a:.2f}" for a in r["acceptance"])
            + f" | {r['plain_ms_per_step']:.2f}"
            f" | {r['speculative_ms_per_step']:.2f}"
            f" | {r['speedup']:.2f} [{r['speedup_q1']:.2f},"
            f" {r['speedup_q3']:.2f}]"
            f" | {r['modelled_accelerator_speedup']:.2f} |"
        )
    for key, value in report.items():
        if key not in ("depths", "config", "machine"):
            print(f"{key}: {json.dumps(value)}")


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def model_and_prompts(args, trunk):
    """The model (untrained with `--quick`, else trained by train.py) and
    its prompts (random, or held out from training)."""
    if args.quick:
        model = untrained_model(trunk)
        prompts = np.random.default_rng(0).integers(
            1, 256, (max(args.batch_sizes) * 2, args.prompt_length)
        )
        prompts = prompts.astype("int32")
    else:
        run_dir = os.path.abspath(os.path.join(args.runs_dir, "trunk"))
        model = keras.models.load_model(train(run_dir, trunk))
        count = max(args.prompts, max(args.batch_sizes))
        prompts = held_out_prompts(run_dir, count, args.prompt_length)
    return model, prompts


def layer_sweep(args, trunk, prompts, max_length, first_row):
    """Step costs of untrained D=1 models of `--sweep-layers` layers, and the
    speed-up they model with the trained model's tokens per forward."""
    sweep = []
    measured = first_row["tokens_per_forward"]
    for layers in args.sweep_layers:
        config = dict(trunk, num_layers=layers)
        row = decode(
            untrained_model(config, mtp_num_layers=1),
            prompts[: args.prompts, None],
            max_length,
            args.rounds,
        )
        sweep.append(
            {
                "num_layers": layers,
                "plain_ms_per_step": row["plain_ms_per_step"],
                "speculative_ms_per_step": row["speculative_ms_per_step"],
                "modelled_cpu_speedup": measured
                * row["plain_ms_per_step"]
                / row["speculative_ms_per_step"],
            }
        )
    return sweep


def main(args):
    load_before = load_average()
    trunk = QUICK_TRUNK if args.quick else TRUNK
    model, prompts = model_and_prompts(args, trunk)
    max_length = args.prompt_length + args.new_tokens
    params = parameter_counts(model)
    report = {"depths": []}
    for depth in args.depths:
        sub = with_depths(model, depth)
        row = decode(
            sub, prompts[: args.prompts, None], max_length, args.rounds
        )
        row["depth"] = depth
        row["modelled_accelerator_speedup"] = modelled_accelerator_speedup(
            params, depth, row["tokens_per_forward"]
        )
        report["depths"].append(row)
        print(json.dumps(row), flush=True)
    first = with_depths(model, args.depths[0])
    if "sampler" in inspect.signature(model.generate).parameters:
        report["sampling"] = decode(
            first,
            prompts[: args.prompts, None],
            max_length,
            args.rounds,
            sampler=args.sampler,
        )
        report["sampling"].update(depth=args.depths[0], sampler=args.sampler)
    else:
        report["sampling"] = "generate() takes no sampler in this version"
    report["tokens_per_forward_by_batch"] = {
        str(b): tokens_per_forward(
            with_depths(model, args.depths[-1]), prompts, max_length, b
        )
        for b in args.batch_sizes
    }
    report["cost_breakdown_ms"] = {
        name: [round(x, 4) for x in q]
        for name, q in cost_breakdown(
            first, args.prompt_length, max_length, args.rounds
        ).items()
    }
    report["layer_sweep"] = layer_sweep(
        args, trunk, prompts, max_length, report["depths"][0]
    )
    report["config"] = dict(
        backend=keras.config.backend(),
        model=(
            f"llama d={trunk['hidden_dim']}, L={trunk['num_layers']}, "
            f"byte vocabulary, {model.mtp_num_layers} MTP depths, "
            + ("untrained (--quick)" if args.quick else "train.py")
        ),
        trunk=trunk,
        params=params,
        prompts=args.prompts,
        prompt_length=args.prompt_length,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        notes=(
            "layer_sweep: untrained trunks, measured step costs only; "
            "modelled_cpu_speedup = the trained model's measured D=1 tokens "
            "per forward x plain/speculative step cost (a model). "
            "modelled_accelerator_speedup: a memory-bound model, not a "
            "measurement."
        ),
    )
    report["machine"] = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        load_average_before=load_before,
        load_average_after=load_average(),
        keras=keras.__version__,
    )
    print_table(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--runs-dir",
        default=os.path.join(tempfile.gettempdir(), "keras_mtp_bench_decode"),
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 4, 16]
    )
    parser.add_argument(
        "--sweep-layers", type=int, nargs="+", default=[2, 4, 8]
    )
    parser.add_argument("--sampler", default="top_k")
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--plot", default=None, help="write the plot here")
    main(parser.parse_args())
