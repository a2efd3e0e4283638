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
trained with `model.fit`. `output_dir` receives `config.json`, `metrics.csv`,
TensorBoard logs, `best.keras` (lowest val_loss), `last.keras` (every
evaluation) and `losses.png`. Rerunning the same command continues from
`last.keras`: model, optimizer, λ, step and data position.
"""

import argparse
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
from keras_mtp import data  # noqa: E402

# Every supported keras-hub family (keras_mtp.backbones.FAMILIES).
BACKBONES = backbones.FAMILY_NAMES


def knob(default, help, **metadata):
    """A config field with its `--help` text (and optional `choices`)."""
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
    hidden_dim: int = knob(64, "Model width d.")
    num_layers: int = knob(2, "Decoder layers of the backbone.")
    num_heads: int = knob(4, "Attention (query) heads.")
    intermediate_dim: int = knob(128, "Feed-forward width.")
    # MTP
    mtp_num_layers: int = knob(2, "MTP depths D (0 = plain causal LM).")
    mtp_loss_scaling_factor: float = knob(
        0.1, "λ for the constant schedule: loss = main + λ · L_mtp."
    )
    mtp_schedule: str = knob(
        "constant",
        "λ schedule: constant, or deepseek (0.3, then 0.1 from "
        "mtp_schedule_switch · steps on, as DeepSeek-V3).",
        choices=("constant", "deepseek"),
    )
    mtp_schedule_switch: float = knob(
        0.7, "Fraction of the steps after which the deepseek λ drops."
    )
    loss_chunk_size: typing.Optional[int] = knob(
        None,
        "Compute every head's loss in chunks of this many tokens (no "
        "(B, T, V) logits: large vocabularies).",
    )
    # data
    data: typing.Optional[str] = knob(
        None, "Corpus directory or glob; None = the Python stdlib .py files."
    )
    tokenizer: str = knob(
        "bytes",
        "bytes, a SentencePiece .model file, or bpe:VOCAB_JSON,MERGES_TXT.",
    )
    validation_fraction: float = knob(0.05, "Share of files for validation.")
    sequence_length: int = knob(128, "Tokens per example.")
    batch_size: int = knob(16, "Examples per step (global, all devices).")
    packing: bool = knob(
        False, "Add segment_ids so no loss crosses a document boundary."
    )
    # optimization
    steps: int = knob(1200, "Training steps.")
    learning_rate: float = knob(3e-3, "Peak Adam learning rate.")
    warmup_steps: int = knob(30, "Linear warmup steps from 0 to the peak.")
    min_learning_rate_ratio: float = knob(
        0.1, "Cosine decay ends at this fraction of the peak."
    )
    eval_interval: int = knob(300, "Steps between evaluations/checkpoints.")
    eval_steps: int = knob(10, "Validation batches per evaluation.")
    seed: int = knob(0, "Seed of the weights, the split and the data order.")
    output_dir: str = knob("runs/default", "Where everything is written.")
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
        None, "Multi-host: number of processes (or env ..._NUM_PROCESSES)."
    )
    process_id: typing.Optional[int] = knob(
        None, "Multi-host: this process (or env ..._PROCESS_ID)."
    )


# -----------------------------------------------------------------------------


def _field_type(field):
    kind = typing.get_type_hints(Config)[field.name]
    if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def load_config_file(path):
    """The fields set in a JSON or YAML file, checked against `Config`."""
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
        kind = _field_type(field)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_parse_bool if kind is bool else kind,
            default=from_file.get(field.name, field.default),
            choices=field.metadata.get("choices"),
            help=field.metadata["help"],
        )
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return Config(**args)


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
    warmup = min(config.warmup_steps, config.steps - 1)
    learning_rate = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
        decay_steps=config.steps - warmup,
        alpha=config.min_learning_rate_ratio,
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return model


# === Distribution ============================================================


def initialize_processes(config):
    """Starts multi-host JAX when asked by flags or the standard variables."""
    env = os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES")
    num_processes = config.num_processes or (int(env) if env else 1)
    if num_processes <= 1:
        return
    if keras.config.backend() != "jax":
        raise ValueError(
            "Multi-process training needs the JAX backend. Received: "
            f"KERAS_BACKEND={keras.config.backend()}"
        )
    import jax

    # CPU processes exchange gradients over gloo; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        job_addresses=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )


def make_distribution(config, model_factory):
    """The `keras.distribution` of `config`, or None for one device."""
    if config.distribution == "none":
        return None
    if keras.config.backend() != "jax":
        raise ValueError(
            f"--distribution={config.distribution} needs the JAX backend. "
            f"Received: KERAS_BACKEND={keras.config.backend()}"
        )
    devices = keras.distribution.list_devices()
    if config.batch_size % len(devices):
        raise ValueError(
            f"batch_size={config.batch_size} must divide over the "
            f"{len(devices)} devices"
        )
    # Each process feeds its own rows of every global batch (data.py shards
    # deterministically), so Keras must not shard the dataset again.
    if config.distribution == "data":
        return keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=False
        )
    try:
        shape = tuple(int(n) for n in config.mesh.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 2 or math.prod(shape) != len(devices):
        raise ValueError(
            "--distribution=model needs --mesh=BATCH,MODEL with "
            f"BATCH·MODEL = {len(devices)} devices. Received: "
            f"mesh={config.mesh!r}"
        )
    mesh = keras.distribution.DeviceMesh(
        shape, axis_names=("batch", "model"), devices=devices
    )
    # The layout map is read off a model's variable paths: build a throwaway
    # copy first (cheap next to training; the real one is built in scope).
    layout_map = keras_mtp.distribution.get_layout_map(model_factory(), mesh)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False
    )


# === Run directory ===========================================================


class SaveLast(keras.callbacks.Callback):
    """Saves `last.keras` after every evaluation, atomically.

    The step to resume from is the optimizer's `iterations`, saved inside the
    same file, so a kill at any moment leaves a consistent checkpoint.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        partial = self.path + ".partial.keras"
        self.model.save(partial)
        os.replace(partial, self.path)


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


def plot_losses(rows, steps_per_epoch, mtp_num_layers, path):
    """`losses.png`: main and per-depth losses, train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [(int(row["epoch"]) + 1) * steps_per_epoch for row in rows]
    keys = ["main_loss"] + [
        f"mtp_loss_{k}" for k in range(1, mtp_num_layers + 1)
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, prefix, title in zip(axes, ("", "val_"), ("train", "validation")):
        for key in keys:
            if prefix + key in rows[0]:
                values = [float(row[prefix + key]) for row in rows]
                ax.plot(steps, values, marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats per token)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(logs, mtp_num_layers):
    """Final loss and accuracy per head, train and validation, as text."""

    def cell(key):
        return f"{float(logs[key]):10.4f}" if key in logs else f"{'-':>10}"

    heads = [("main (token +1)", "main_loss", "sparse_categorical_accuracy")]
    heads += [
        (
            f"MTP depth {k} (token +{k + 1})",
            f"mtp_loss_{k}",
            f"mtp_accuracy_{k}",
        )
        for k in range(1, mtp_num_layers + 1)
    ]
    lines = [
        f"{'head':<24}{'train loss':>12}{'val loss':>12}"
        f"{'train acc':>12}{'val acc':>12}"
    ]
    for name, loss, accuracy in heads:
        lines.append(
            f"{name:<24}  {cell(loss)}  {cell('val_' + loss)}"
            f"  {cell(accuracy)}  {cell('val_' + accuracy)}"
        )
    return "\n".join(lines)


# === Main ====================================================================


def report_speculation(model, dataset, config, num_prompts=4):
    """Decodes validation prompts with the MTP heads as drafters and prints
    what speculation buys: tokens per main forward pass and acceptance."""
    prompt_length = max(config.sequence_length // 4, 1)
    # GPT-2's and OPT's position tables end at sequence_length; drafts look
    # D ahead.
    max_length = config.sequence_length - config.mtp_num_layers
    if max_length <= prompt_length:
        return
    x, _, _ = next(iter(dataset))
    prompts = np.asarray(x["token_ids"])[:num_prompts, :prompt_length]
    positions = forward_passes = 0
    acceptance = []
    for prompt in prompts:  # batch 1: each prompt advances on its own
        _, stats = model.generate(
            prompt, max_length=max_length, return_stats=True
        )
        positions += max_length - prompt_length
        forward_passes += stats["forward_passes"]
        acceptance.append(stats["acceptance"])
    rates = ", ".join(
        f"depth {k}: {rate:.2f}"
        for k, rate in enumerate(np.mean(acceptance, axis=0), start=1)
    )
    print(
        f"Speculative decoding of {len(prompts)} validation prompts "
        f"({prompt_length} + {max_length - prompt_length} tokens, greedy): "
        f"{positions / forward_passes:.2f} tokens per main forward pass "
        f"(at most {config.mtp_num_layers + 1}); draft acceptance {rates}"
    )


def main(config):
    start = time.time()
    initialize_processes(config)
    process, processes = 0, 1
    if keras.config.backend() == "jax":
        import jax

        process, processes = jax.process_index(), jax.process_count()
    run_dir = config.output_dir
    if processes > 1 and process > 0:  # every process logs; one owns the run
        run_dir = os.path.join(run_dir, f"process_{process}")
    os.makedirs(run_dir, exist_ok=True)
    paths = {
        name: os.path.join(run_dir, name)
        for name in ("config.json", "metrics.csv", "best.keras", "last.keras")
    }
    config_dict = dataclasses.asdict(config)
    if os.path.exists(paths["last.keras"]):
        with open(paths["config.json"]) as f:
            saved = json.load(f)
        # The directory may be named another way (relative, absolute).
        changed = sorted(
            k
            for k in config_dict
            if k != "output_dir" and saved.get(k) != config_dict[k]
        )
        if changed:
            raise ValueError(
                f"{run_dir} holds a run with another config (fields "
                f"{changed} differ); use a new --output-dir to start afresh."
            )
    with open(paths["config.json"], "w") as f:
        json.dump(config_dict, f, indent=2)

    # === Data ===
    tokenizer = data.load_tokenizer(config.tokenizer)
    # Padded to a multiple of 64 (as nanoGPT does) so the vocabulary divides
    # any model-parallel mesh axis; the extra ids never occur in the data.
    vocabulary_size = 64 * math.ceil(data.vocabulary_size(tokenizer) / 64)
    files = data.list_corpus_files(config.data)
    train_files, val_files = data.split_files(
        files, config.validation_fraction, seed=config.seed
    )
    cache_dir = os.path.join(
        os.path.dirname(os.path.abspath(run_dir)), ".token_cache"
    )
    dataset_kwargs = dict(
        sequence_length=config.sequence_length,
        batch_size=config.batch_size,
        packing=config.packing,
        num_shards=processes,
        shard_index=process,
        cache_dir=cache_dir,
        tokenizer=tokenizer,
    )

    # === Model (fresh, or resumed from last.keras) ===
    distribution = make_distribution(
        config, lambda: build_model(config, vocabulary_size)
    )
    if distribution is not None:
        keras.distribution.set_distribution(distribution)
    resumed = os.path.exists(paths["last.keras"])
    # Seeded here, after the layout map's throwaway model drew its weights,
    # so every distribution starts from the same weights as one device.
    keras.utils.set_random_seed(config.seed)
    if resumed:
        model = keras.models.load_model(paths["last.keras"])
    else:
        model = build_model(config, vocabulary_size)
    steps_per_epoch = min(config.eval_interval, config.steps)
    epochs = math.ceil(config.steps / steps_per_epoch)
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    initial_epoch = step // steps_per_epoch
    truncate_metrics(paths["metrics.csv"], initial_epoch)
    history_rows = read_metrics(paths["metrics.csv"])
    backbone_params = model.backbone.count_params()
    print(
        f"corpus: {len(files)} files ({len(train_files)} train, "
        f"{len(val_files)} validation) from {config.data or 'Python stdlib'}\n"
        f"{config.backbone}: {backbone_params:,} backbone parameters, "
        f"{model.count_params() - backbone_params:,} in "
        f"{config.mtp_num_layers} MTP depths; "
        + (f"resuming at step {step}" if resumed else "starting")
        + (
            f" on {len(keras.distribution.list_devices())} devices, "
            f"process {process}/{processes}"
            if distribution
            else ""
        )
    )
    train_ds = data.make_dataset(
        train_files,
        seed=config.seed,
        start_step=initial_epoch * steps_per_epoch,
        **dataset_kwargs,
    )
    # A fixed validation set: the same `eval_steps` batches at every eval.
    val_ds = (
        data.make_dataset(val_files, shuffle=False, **dataset_kwargs)
        .take(config.eval_steps)
        .cache()
        .repeat()
    )

    # === Training ===
    callbacks = []
    if config.mtp_schedule == "deepseek" and config.mtp_num_layers:
        switch = config.mtp_schedule_switch * config.steps
        # First, so that λ is in the logs the CSV and TensorBoard write.
        callbacks.append(
            keras_mtp.callbacks.MTPLossScheduler(
                lambda step: 0.3 if step < switch else 0.1
            )
        )
    callbacks += [
        SaveLast(paths["last.keras"]),  # before the CSV row of its epoch
        keras.callbacks.ModelCheckpoint(
            paths["best.keras"],
            monitor="val_loss",
            save_best_only=True,
            initial_value_threshold=min(
                (float(row["val_loss"]) for row in history_rows), default=None
            ),
        ),
        keras.callbacks.CSVLogger(paths["metrics.csv"], append=resumed),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard")),
    ]
    if initial_epoch < epochs:
        model.fit(
            train_ds,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_ds,
            validation_steps=config.eval_steps,
            shuffle=False,  # the dataset orders the rows itself
            callbacks=callbacks,
            verbose="auto" if sys.stdout.isatty() else 2,
        )

    rows = read_metrics(paths["metrics.csv"])
    plot_losses(
        rows,
        steps_per_epoch,
        config.mtp_num_layers,
        os.path.join(run_dir, "losses.png"),
    )
    minutes = (time.time() - start) / 60
    print(
        f"\nFinal metrics after {epochs * steps_per_epoch} steps "
        f"({minutes:.1f} min). Loss in nats per token; train = mean over the "
        f"last {steps_per_epoch} steps, val = {config.eval_steps} batches:"
    )
    print(summary_table(rows[-1], config.mtp_num_layers))
    if config.mtp_num_layers and distribution is None:
        report_speculation(model, val_ds, config)
    print(f"saved to {run_dir}/")


if __name__ == "__main__":
    main(parse_config())
