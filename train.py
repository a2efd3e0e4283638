"""Train a small byte-level language model with Multi-Token Prediction.

    python train.py                              # Llama, Python stdlib, ~3 min
    python train.py --backbone=gemma --mtp-num-layers=1
    python train.py --data="~/src/**/*.py" --steps=20000
    python train.py --help

The corpus (default: the `.py` files of the running Python's standard
library) is split by file into training and validation files. A keras-hub
backbone built from the config below is wrapped in `keras_mtp.MTPCausalLM`
and trained with `model.fit`; validation runs every `eval_interval` steps on
the same `eval_steps` batches. `output_dir` receives `config.json`,
`metrics.csv` (one row per evaluation) and `model.keras`. At the end a table
gives the final loss and top-1 accuracy of the main head and of each MTP depth.
"""

import argparse
import dataclasses
import json
import math
import os
import time
import typing

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tf.data only: quiet

import keras  # noqa: E402
import keras_hub  # noqa: E402

import keras_mtp  # noqa: E402
from keras_mtp import data  # noqa: E402

BACKBONES = ("gpt2", "llama", "gemma", "qwen3", "qwen3_moe")


def knob(default, help, **metadata):
    """A config field with its `--help` text (and optional `choices`)."""
    return dataclasses.field(
        default=default, metadata=dict(help=help, **metadata)
    )


# -----------------------------------------------------------------------------
# All knobs. The defaults train in 2.5-3.5 minutes on 2 CPU cores (JAX).
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
    mtp_loss_scaling_factor: float = knob(0.1, "λ: loss = main + λ · L_mtp.")
    # data
    data: typing.Optional[str] = knob(
        None, "Corpus directory or glob; None = the Python stdlib .py files."
    )
    validation_fraction: float = knob(0.05, "Share of files for validation.")
    sequence_length: int = knob(128, "Tokens (bytes) per example.")
    batch_size: int = knob(16, "Examples per step.")
    # training
    steps: int = knob(600, "Training steps.")
    learning_rate: float = knob(2e-3, "Adam learning rate.")
    eval_interval: int = knob(150, "Steps between evaluations (an epoch).")
    eval_steps: int = knob(10, "Validation batches per evaluation.")
    seed: int = knob(0, "Seed of the weights, the split and the shuffles.")
    output_dir: str = knob(
        "runs/default", "Where config, metrics and model go."
    )


# -----------------------------------------------------------------------------


def parse_config(argv=None):
    """A `Config` from `--field-name=value` flags, one per dataclass field."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        kind = hints[field.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=kind,
            default=field.default,
            choices=field.metadata.get("choices"),
            help=field.metadata["help"],
        )
    return Config(**vars(parser.parse_args(argv)))


def make_backbone(config):
    """The keras-hub backbone of `config.backbone`, sized by the config."""
    c = config
    assert c.hidden_dim % c.num_heads == 0, (
        f"hidden_dim={c.hidden_dim} must be a multiple of "
        f"num_heads={c.num_heads}"
    )
    common = dict(
        vocabulary_size=data.VOCABULARY_SIZE,
        num_layers=c.num_layers,
        hidden_dim=c.hidden_dim,
        intermediate_dim=c.intermediate_dim,
    )
    # Grouped-query attention: two query heads share a key/value head.
    heads = dict(
        num_query_heads=c.num_heads,
        num_key_value_heads=max(1, c.num_heads // 2),
    )
    head_dim = c.hidden_dim // c.num_heads
    if c.backbone == "gpt2":
        return keras_hub.models.GPT2Backbone(
            num_heads=c.num_heads,
            dropout=0.0,
            max_sequence_length=c.sequence_length,
            **common,
        )
    if c.backbone == "llama":
        return keras_hub.models.LlamaBackbone(**heads, **common)
    if c.backbone == "gemma":
        return keras_hub.models.GemmaBackbone(
            head_dim=head_dim, **heads, **common
        )
    if c.backbone == "qwen3":
        return keras_hub.models.Qwen3Backbone(
            head_dim=head_dim, **heads, **common
        )
    if c.backbone == "qwen3_moe":
        return keras_hub.models.Qwen3MoeBackbone(
            head_dim=head_dim,
            moe_intermediate_dim=c.intermediate_dim // 2,
            num_experts=4,
            top_k=2,
            **heads,
            **common,
        )
    raise ValueError(
        f"Unknown backbone. Expected one of {BACKBONES}. "
        f"Received: backbone={c.backbone!r}"
    )


def summary_table(logs, mtp_num_layers):
    """Final loss and accuracy per head, train and validation, as text."""

    def cell(key):
        return f"{logs[key]:10.4f}" if key in logs else f"{'-':>10}"

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


def main(config):
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)

    # === Data ===
    files = data.list_corpus_files(config.data)
    train_files, val_files = data.split_files(
        files, config.validation_fraction, seed=config.seed
    )
    train_ds = data.make_dataset(
        train_files, config.sequence_length, config.batch_size, seed=config.seed
    )
    # A fixed validation set: the same `eval_steps` batches at every eval
    # (cached, then repeated, because Keras keeps one validation iterator).
    val_ds = (
        data.make_dataset(
            val_files,
            config.sequence_length,
            config.batch_size,
            seed=config.seed + 1,
        )
        .take(config.eval_steps)
        .cache()
        .repeat()
    )
    print(
        f"corpus: {len(files)} files ({len(train_files)} train, "
        f"{len(val_files)} validation) from {config.data or 'Python stdlib'}"
    )

    # === Model ===
    backbone = make_backbone(config)
    model = keras_mtp.MTPCausalLM(
        backbone,
        mtp_num_layers=config.mtp_num_layers,
        mtp_loss_scaling_factor=config.mtp_loss_scaling_factor,
    )
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    print(
        f"{config.backbone}: {backbone.count_params():,} backbone parameters, "
        f"{model.count_params() - backbone.count_params():,} in "
        f"{config.mtp_num_layers} MTP depths"
    )

    # === Training ===
    # One Keras epoch = `eval_interval` steps, so validation runs after each.
    steps_per_epoch = min(config.eval_interval, config.steps)
    epochs = math.ceil(config.steps / steps_per_epoch)
    history = model.fit(
        train_ds,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=val_ds,
        validation_steps=config.eval_steps,
        shuffle=False,  # `make_dataset` shuffles
        callbacks=[
            keras.callbacks.CSVLogger(
                os.path.join(config.output_dir, "metrics.csv")
            )
        ],
        verbose=2,
    )
    model.save(os.path.join(config.output_dir, "model.keras"))

    final = {key: values[-1] for key, values in history.history.items()}
    minutes = (time.time() - start) / 60
    print(
        f"\nFinal metrics after {epochs * steps_per_epoch} steps "
        f"({minutes:.1f} min). Loss in nats per byte; train = mean over the "
        f"last {steps_per_epoch} steps, val = {config.eval_steps} batches:"
    )
    print(summary_table(final, config.mtp_num_layers))
    print(f"saved to {config.output_dir}/")


if __name__ == "__main__":
    main(parse_config())
