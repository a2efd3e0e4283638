"""Pre-train a language model with Multi-Token Prediction, laptop to pod.

    python train.py                                   # ~2.5 min, 2 CPU cores
    python train.py --backbone=gemma --mtp-num-layers=1 --steps=2000
    python train.py --config=run.yaml --distribution=model --mesh=2,4
    python train.py --help

The corpus (default: the `.py` files of the running Python's standard library)
is split by file into training and validation files, tokenized once into a
token file under `<output_dir>/../.token_cache` and read by position, so an
interrupted run resumes on exactly the batches it would have seen. A keras-hub
backbone built from the config is wrapped in `keras_mtp.MTPCausalLM` and
trained with `model.fit` for exactly `steps` steps. `output_dir` receives
`config.json`, `metrics.csv` (one row per evaluation, with tokens/s and MFU),
`train_losses.csv` (every `log_interval` steps), TensorBoard logs,
`checkpoints/` (Orbax, asynchronous and sharded: every process writes its
shards, the last two evaluations are kept), `best.keras` (lowest val_loss)
and `model.keras` (the final model) where every weight is addressable from
one process, and `losses.png`. Rerunning the same command continues from the
newest complete checkpoint: model, optimizer, λ, step and data position.
"""

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
import typing

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tf.data only: quiet

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_mtp  # noqa: E402
from keras_mtp import backbones  # noqa: E402
from keras_mtp import checkpoint  # noqa: E402
from keras_mtp import data  # noqa: E402
from keras_mtp import flops  # noqa: E402
from keras_mtp import report as report_lib  # noqa: E402
from keras_mtp import validation  # noqa: E402

# Every supported keras-hub family (keras_mtp.backbones.FAMILIES).
BACKBONES = backbones.FAMILY_NAMES


def knob(default, help, **metadata):
    """A config field with its `--help` text, optional `choices` and, for a
    number, its range: `minimum` / `maximum` (inclusive) and
    `exclusive_minimum` / `exclusive_maximum`, as in JSON Schema.
    `check_range` enforces it on flags, config files and `Config(...)`."""
    return dataclasses.field(
        default=default, metadata=dict(help=help, **metadata)
    )


# -----------------------------------------------------------------------------
# All knobs. The defaults train in about 2.5 minutes on 2 CPU cores (JAX).
@dataclasses.dataclass
class Config:
    # model
    backbone: str = knob(
        "llama", "keras-hub backbone family.", choices=BACKBONES
    )
    hidden_dim: int = knob(64, "Model width d.", minimum=1)
    num_layers: int = knob(2, "Decoder layers of the backbone.", minimum=1)
    num_heads: int = knob(4, "Attention (query) heads.", minimum=1)
    intermediate_dim: int = knob(128, "Feed-forward width.", minimum=1)
    # MTP
    mtp_num_layers: int = knob(
        2, "MTP depths D (0 = plain causal LM).", minimum=0
    )
    mtp_loss_scaling_factor: float = knob(
        0.1,
        "λ for the constant schedule: loss = main + λ · L_mtp.",
        minimum=0,
    )
    mtp_schedule: str = knob(
        "constant",
        "λ schedule: constant, or deepseek (0.3, then 0.1 from "
        "mtp_schedule_switch · steps on, as DeepSeek-V3).",
        choices=("constant", "deepseek"),
    )
    mtp_schedule_switch: float = knob(
        0.7,
        "Fraction of the steps after which the deepseek λ drops (0: 0.1 "
        "throughout, 1: 0.3 throughout).",
        minimum=0,
        maximum=1,
    )
    loss_chunk_size: typing.Optional[int] = knob(
        None,
        "Compute every head's loss in chunks of this many tokens (no "
        "(B, T, V) logits: large vocabularies).",
        minimum=1,
    )
    # data
    data: typing.Optional[str] = knob(
        None, "Corpus directory or glob; None = the Python stdlib .py files."
    )
    tokenizer: str = knob(
        "bytes",
        "bytes, a SentencePiece .model file, or bpe:VOCAB_JSON,MERGES_TXT.",
    )
    validation_fraction: float = knob(
        0.05,
        "Share of files for validation.",
        exclusive_minimum=0,
        exclusive_maximum=1,
    )
    sequence_length: int = knob(128, "Tokens per example.", minimum=1)
    batch_size: int = knob(
        16, "Examples per step (global, all devices).", minimum=1
    )
    packing: bool = knob(
        False,
        "Pack documents into rows with segment_ids: a token attends only "
        "to its own document, positions restart at each document, and no "
        "loss crosses a boundary (every family but qwen3_5 and "
        "qwen3_5_moe).",
    )
    # optimization
    steps: int = knob(1200, "Training steps.", minimum=1)
    learning_rate: float = knob(
        3e-3, "Peak Adam learning rate.", exclusive_minimum=0
    )
    warmup_steps: int = knob(
        30, "Linear warmup steps from 0 to the peak.", minimum=0
    )
    min_learning_rate_ratio: float = knob(
        0.1,
        "Cosine decay ends at this fraction of the peak.",
        minimum=0,
        maximum=1,
    )
    eval_interval: int = knob(
        300, "Steps between evaluations/checkpoints.", minimum=1
    )
    eval_steps: int = knob(10, "Validation batches per evaluation.", minimum=1)
    log_interval: int = knob(
        20,
        "Steps per row of train_losses.csv (the curves of losses.png).",
        minimum=1,
    )
    seed: int = knob(
        0,
        "Seed of the weights, the split and the data order.",
        minimum=0,
        maximum=2**32 - 1,  # keras.utils.set_random_seed's range
    )
    output_dir: str = knob("runs/default", "Where everything is written.")
    # MTP heads for a pretrained model
    preset: typing.Optional[str] = knob(
        None,
        "A keras-hub preset (local directory, hf://..., a built-in name) "
        "to add MTP heads to, with --heads-only.",
    )
    heads_only: bool = knob(
        False,
        "Train only the MTP depths of --preset on its frozen trunk's "
        "cached features (keras_mtp.heads.fit_heads: --steps, "
        "--batch-size, --sequence-length, --learning-rate, "
        "--mtp-num-layers, --data) and save the preset to "
        "<output_dir>/preset.",
    )
    # distribution (JAX)
    distribution: str = knob(
        "none",
        "none (one device), data (DataParallel over all devices) or model "
        "(ModelParallel on --mesh).",
        choices=("none", "data", "model"),
    )
    mesh: str = knob("", "Mesh shape 'batch,model' for --distribution=model.")
    coordinator_address: typing.Optional[str] = knob(
        None,
        "Multi-host: host:port of process 0 (or "
        "KERAS_DISTRIBUTION_JOB_ADDRESSES).",
    )
    num_processes: typing.Optional[int] = knob(
        None,
        "Multi-host: number of processes (or env ..._NUM_PROCESSES).",
        minimum=1,
    )
    process_id: typing.Optional[int] = knob(
        None, "Multi-host: this process (or env ..._PROCESS_ID).", minimum=0
    )

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_range(field, getattr(self, field.name))
        if self.packing:
            try:
                backbones.check_packing(self.backbone)
            except ValueError as e:
                raise ValueError(f"--packing: {e}") from None


# -----------------------------------------------------------------------------

_FIELDS = {field.name: field for field in dataclasses.fields(Config)}


def _field_type(field):
    kind = typing.get_type_hints(Config)[field.name]
    if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


_BOUNDS = ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")


def _number(field):
    """`check_number`'s arguments for a number field, or None."""
    kind = _field_type(field)
    if kind not in (int, float):
        return None
    bounds = {k: v for k, v in field.metadata.items() if k in _BOUNDS}
    return dict(kind=kind, optional=field.default is None, **bounds)


def _range_text(field):
    """`field`'s range as text (`an int >= 1`, `a finite float in (0, 1)`),
    or None for a field that is not a number."""
    number = _number(field)
    return number and validation.number_text(**number)


def check_range(field, value):
    """A `ValueError` naming the field and the value unless `value` is of
    `field`'s numeric type (an int, no bool; a finite float) in its range
    (`knob`'s `minimum`, `maximum`, `exclusive_minimum`,
    `exclusive_maximum`). Other fields, and None for an optional one, pass.
    """
    number = _number(field)
    if number:
        validation.check_number(value, field.name, **number)


def _help(field):
    """The `--help` text of `field`, with its range."""
    text = _range_text(field)
    return field.metadata["help"] + (f" ({text})" if text else "")


def _flag_type(field):
    """What parses `--field=TEXT` (and a config file's value, as that
    text): the field's type, then `check_range`, so a flag and a file are
    refused alike, with argparse's message and before anything is built."""
    kind = _field_type(field)
    parse = _parse_bool if kind is bool else kind

    def parse_and_check(text):
        value = parse(text)  # ValueError: argparse's "invalid int value"
        try:
            check_range(field, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse_and_check.__name__ = parse.__name__  # argparse names the type
    return parse_and_check


def _field_default(name):
    return _FIELDS[name].default


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def load_config_file(path):
    """The fields set in a JSON or YAML file, by name (checked against
    `Config`'s names here, against its types, choices and ranges by
    `parse_config`)."""
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(f) or {}
        else:
            values = json.load(f)
    names = {field.name for field in dataclasses.fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"Unknown field(s) {unknown} in config file {path}")
    return values


def parse_config(argv=None):
    """A `Config`: defaults, then `--config FILE`, then `--field=value`."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    from_file = load_config_file(known.config) if known.config else {}

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config", help="JSON or YAML file of fields (flags override it)."
    )
    for field in dataclasses.fields(Config):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_flag_type(field),
            default=field.default,
            choices=field.metadata.get("choices"),
            help=_help(field),
        )
    # A file value passes exactly its flag's checks: it is parsed as the
    # text `--field=value` would be (`steps: 20.5`, `steps: 0` and
    # `mtp_schedule: DeepSeek` fail as the flags do). `null` keeps an
    # optional default.
    defaults = {}
    parser.exit_on_error = False  # raise ArgumentError: the file is named
    for name, value in from_file.items():
        if value is None and _field_default(name) is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        text = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            defaults[name] = getattr(
                parser.parse_args([f"{flag}={text}"]), name
            )
        except argparse.ArgumentError as e:
            parser.error(f"{e} (from {name}: {value!r} in {known.config})")
    parser.exit_on_error = True
    parser.set_defaults(**defaults)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    try:
        return Config(**args)
    except ValueError as e:  # a combination of fields (--packing)
        parser.error(str(e))


def make_backbone(config, vocabulary_size):
    """The keras-hub backbone of `config.backbone`, sized by the config
    (each family's config: `keras_mtp.backbones.FAMILIES`)."""
    c = config
    if c.hidden_dim % c.num_heads:
        raise ValueError(
            f"hidden_dim={c.hidden_dim} must be a multiple of "
            f"num_heads={c.num_heads}"
        )
    if c.backbone not in BACKBONES:
        raise ValueError(
            f"Unknown backbone. Expected one of {BACKBONES}. "
            f"Received: backbone={c.backbone!r}"
        )
    return backbones.build_backbone(
        c.backbone,
        vocabulary_size=vocabulary_size,
        hidden_dim=c.hidden_dim,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        intermediate_dim=c.intermediate_dim,
        sequence_length=c.sequence_length,
    )


def build_model(config, vocabulary_size):
    model = keras_mtp.MTPCausalLM(
        make_backbone(config, vocabulary_size),
        mtp_num_layers=config.mtp_num_layers,
        mtp_loss_scaling_factor=(
            0.3
            if config.mtp_schedule == "deepseek"
            else config.mtp_loss_scaling_factor
        ),
        loss_chunk_size=config.loss_chunk_size,
    )
    learning_rate = keras_mtp.callbacks.warmup_cosine(
        config.learning_rate,
        config.steps,
        config.warmup_steps,
        config.min_learning_rate_ratio,
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return model


# === Run directory ===========================================================


@dataclasses.dataclass
class Run:
    """Where this process writes, and which process it is."""

    directory: str
    process: int = 0
    processes: int = 1

    def path(self, name):
        return os.path.join(self.directory, name)


def checkpoint_directory(config):
    """The run's Orbax checkpoints, one directory for all processes."""
    return os.path.join(os.path.abspath(config.output_dir), "checkpoints")


def read_metrics(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def truncate_metrics(path, epochs):
    """Keeps the CSV rows of the first `epochs` epochs (those checkpointed)."""
    rows = read_metrics(path)[:epochs]
    if not rows:
        if os.path.exists(path):
            os.remove(path)
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# === Main: set-up, data, model, callbacks, training, report =================


def set_up(config):
    """Starts the processes and prepares the run directory: `config.json`,
    checked against the one a resumed run saved."""
    keras_mtp.distribution.initialize_processes(
        config.num_processes, config.coordinator_address, config.process_id
    )
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax: lines per save
    run = Run(config.output_dir)
    if keras.config.backend() == "jax":
        import jax

        run.process, run.processes = jax.process_index(), jax.process_count()
    if run.process > 0:  # every process logs; one owns the run
        run.directory = os.path.join(run.directory, f"process_{run.process}")
    os.makedirs(run.directory, exist_ok=True)
    config_dict = dataclasses.asdict(config)
    if checkpoint.complete_checkpoints(checkpoint_directory(config)):
        try:
            with open(run.path("config.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{run.directory} holds checkpoints but no readable "
                f"config.json ({e}); use a new --output-dir to start afresh."
            ) from e
        # The directory may be named another way (relative, absolute).
        changed = sorted(
            k
            for k in config_dict
            if k != "output_dir" and saved.get(k) != config_dict[k]
        )
        if changed:
            raise ValueError(
                f"{run.directory} holds a run with another config (fields "
                f"{changed} differ); use a new --output-dir to start afresh."
            )
    with open(run.path("config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
    return run


def load_data(config):
    """The corpus, tokenized once into `<output_dir>/../.token_cache`,
    shared by every process (each writes it atomically if it is missing)."""
    cache_dir = os.path.join(
        os.path.dirname(os.path.abspath(config.output_dir)), ".token_cache"
    )
    return data.load_corpus(
        config.data,
        config.tokenizer,
        config.validation_fraction,
        config.seed,
        cache_dir,
    )


def make_datasets(config, run, corpus, start_step):
    """The training batches from `start_step` on (each process its rows of
    every global batch) and a fixed validation set: the same `eval_steps`
    batches at every evaluation."""
    kwargs = dict(
        sequence_length=config.sequence_length,
        batch_size=config.batch_size,
        packing=config.packing,
        num_shards=run.processes,
        shard_index=run.process,
        tokenizer=corpus.tokenizer,
    )
    train_ds = data.make_dataset(
        corpus.train_tokens, seed=config.seed, start_step=start_step, **kwargs
    )
    val_ds = data.make_dataset(corpus.val_tokens, shuffle=False, **kwargs)
    val_ds = val_ds.take(config.eval_steps).cache().repeat()
    return train_ds, val_ds


def make_model(config, vocabulary_size):
    """The model of `config`, in the current distribution's scope (each
    weight is created sharded), restored from the newest checkpoint when
    the run is resumed."""
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, vocabulary_size)
    checkpoint.restore_checkpoint(model, checkpoint_directory(config))
    return model


def addressable(config, run):
    """Whether this process holds every weight whole (one process, or
    replicated weights), so that `model.save` can write a `.keras` file."""
    return run.processes == 1 or config.distribution != "model"


def make_callbacks(config, run, model, steps_per_epoch):
    """In order: λ first (its value is logged), then throughput, then the
    logs of the epoch, and only then its checkpoint, so a kill at any
    instant loses nothing (a rerun retrains what has no checkpoint)."""
    history = read_metrics(run.path("metrics.csv"))
    callbacks = []
    if config.mtp_schedule == "deepseek" and config.mtp_num_layers:
        switch = config.mtp_schedule_switch * config.steps
        callbacks.append(
            keras_mtp.callbacks.MTPLossScheduler(
                keras_mtp.callbacks.deepseek_v3_schedule(switch)
            )
        )
    peak = None
    if keras.config.backend() == "jax":
        import jax

        kind = jax.devices()[0].device_kind
        peak = flops.peak_flops_per_device(kind)
        peak = peak and peak * jax.device_count()
    if run.processes > 1:
        callbacks.append(keras_mtp.callbacks.SynchronousEvaluation())
    callbacks += [
        keras_mtp.callbacks.StopAtStep(config.steps, steps_per_epoch),
        keras_mtp.callbacks.Throughput(
            config.batch_size * config.sequence_length,
            flops.training_flops_per_token(model, config.sequence_length),
            peak,
        ),
        keras_mtp.callbacks.TrainingLossLog(
            run.path("train_losses.csv"), config.log_interval
        ),
        keras_mtp.callbacks.MetricsCSV(run.path("metrics.csv"), append=True),
        keras.callbacks.TensorBoard(run.path("tensorboard")),
    ]
    if addressable(config, run):
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                run.path("best.keras"),
                monitor="val_loss",
                save_best_only=True,
                initial_value_threshold=min(
                    (float(row["val_loss"]) for row in history), default=None
                ),
            )
        )
    # Last: a checkpoint is written once its epoch is logged. Asynchronous:
    # training goes on while it is written; the previous one is kept.
    callbacks.append(
        keras.callbacks.OrbaxCheckpoint(
            checkpoint_directory(config), save_freq="epoch", max_to_keep=2
        )
    )
    return callbacks


def train(config, run, model, corpus):
    """`model.fit` from the model's step to exactly `config.steps`, one
    epoch per evaluation; then `model.keras` where it can be written."""
    steps_per_epoch = min(config.eval_interval, config.steps)
    epochs = math.ceil(config.steps / steps_per_epoch)
    step = keras_mtp.callbacks.global_step(model)
    # Checkpoints are written at epoch ends: multiples of steps_per_epoch,
    # or config.steps for the last, shorter one.
    done = math.ceil(step / steps_per_epoch)
    truncate_metrics(run.path("metrics.csv"), done)
    if done < epochs:
        train_ds, val_ds = make_datasets(config, run, corpus, step)
        model.fit(
            train_ds,
            epochs=epochs,
            initial_epoch=done,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_ds,
            validation_steps=config.eval_steps,
            shuffle=False,  # the dataset orders the rows itself
            callbacks=make_callbacks(config, run, model, steps_per_epoch),
            verbose="auto" if sys.stdout.isatty() else 2,
        )
    if addressable(config, run):
        model.save(run.path("model.keras"))


def report_speculation(config, run, model, corpus, num_prompts=4):
    """Decodes validation prompts with the MTP heads as drafters and prints
    what speculation buys: tokens per main forward pass and acceptance."""
    prompt_length = max(config.sequence_length // 4, 1)
    # GPT-2's and OPT's position tables end at sequence_length; drafts look
    # D ahead.
    max_length = config.sequence_length - config.mtp_num_layers
    if max_length <= prompt_length:
        return
    _, val_ds = make_datasets(config, run, corpus, start_step=0)
    x, _, _ = next(iter(val_ds))
    prompts = np.asarray(x["token_ids"])[:num_prompts, :prompt_length]
    print(report_lib.speculation_report(model, prompts, max_length))


def report(config, run, model, corpus, start):
    """`losses.png`, the final metrics per head and, on one device, what
    speculative decoding with the trained MTP heads buys."""
    rows = read_metrics(run.path("metrics.csv"))
    steps_per_epoch = min(config.eval_interval, config.steps)
    for row in rows:  # the step of each evaluation
        row["step"] = min(
            (int(row["epoch"]) + 1) * steps_per_epoch, config.steps
        )
    report_lib.plot_losses(
        read_metrics(run.path("train_losses.csv")),
        rows,
        config.mtp_num_layers,
        run.path("losses.png"),
    )
    last = rows[-1]
    last_steps = config.steps - (len(rows) - 1) * steps_per_epoch
    print(
        f"\nFinal metrics after {config.steps} steps "
        f"({(time.time() - start) / 60:.1f} min). Loss in nats per token; "
        f"train = mean over the last {last_steps} steps, "
        f"val = {config.eval_steps} batches:"
    )
    print(report_lib.summary_table(last, config.mtp_num_layers))
    mfu = last["mfu"]
    print(
        f"Throughput (last evaluation interval, all devices, MTP depths "
        f"included): {float(last['tokens_per_second']):,.0f} tokens/s, MFU "
        + ("n/a (peak unknown)" if mfu == "n/a" else f"{float(mfu):.1%}")
    )
    if config.mtp_num_layers and config.distribution == "none":
        report_speculation(config, run, model, corpus)
    print(f"saved to {run.directory}/")


def heads_only(config):
    """`--preset DIR --heads-only`: the MTP depths of a pretrained model,
    trained on its frozen trunk (`keras_mtp.heads.fit_heads`), saved with
    the trunk as a preset in `<output_dir>/preset`."""
    from keras_mtp import heads

    if not config.preset:
        raise ValueError(
            "--heads-only trains the MTP heads of a pretrained model: give "
            "it with --preset (a local directory, hf://..., a built-in "
            "name). Received: preset=None"
        )
    keras.utils.set_random_seed(config.seed)
    model = keras_mtp.MTPCausalLM.from_preset(
        config.preset, mtp_num_layers=config.mtp_num_layers
    )
    files = data.list_corpus_files(config.data)
    train_files, _ = data.split_files(
        files, config.validation_fraction, seed=config.seed
    )
    texts = []
    for path in train_files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    history = heads.fit_heads(
        model,
        texts,
        steps=config.steps,
        batch_size=config.batch_size,
        sequence_length=config.sequence_length,
        learning_rate=config.learning_rate,
        max_rows=config.steps * config.batch_size,  # one pass at most
        seed=config.seed,
        verbose=2,
    )
    os.makedirs(config.output_dir, exist_ok=True)
    preset = os.path.join(config.output_dir, "preset")
    model.save_to_preset(preset)
    final = {k: float(v[-1]) for k, v in history.history.items()}
    print(
        f"heads: {history.tokens:,} tokens cached in "
        f"{history.features_seconds:.0f} s; {final}; saved to {preset}"
    )
    return history


def main(config):
    if config.heads_only:
        return heads_only(config)
    start = time.time()
    run = set_up(config)
    corpus = load_data(config)
    distribution = keras_mtp.distribution.make_distribution(
        config.distribution,
        config.backbone,
        config.mtp_num_layers,
        config.batch_size,
        config.mesh,
    )
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        model = make_model(config, corpus.vocabulary_size)
        backbone_params = model.backbone.count_params()
        step = keras_mtp.callbacks.global_step(model)
        print(
            f"corpus: {corpus.num_files} files from "
            f"{config.data or 'Python stdlib'}, "
            f"{len(corpus.train_tokens):,} + {len(corpus.val_tokens):,} "
            f"tokens (train + validation) from "
            f"{corpus.kept_bytes / corpus.num_bytes:.1%} of its "
            f"{corpus.num_bytes:,} bytes\n"
            f"{config.backbone}: {backbone_params:,} backbone parameters, "
            f"{model.count_params() - backbone_params:,} in "
            f"{config.mtp_num_layers} MTP depths, "
            f"{flops.training_flops_per_token(model, config.sequence_length):,}"
            " training FLOPs per token (MTP depths included); "
            + (f"resuming at step {step}" if step else "starting")
            + (
                f" on {len(keras.distribution.list_devices())} devices, "
                f"process {run.process}/{run.processes}"
                if distribution
                else ""
            )
        )
        train(config, run, model, corpus)
    report(config, run, model, corpus, start)


if __name__ == "__main__":
    main(parse_config())
