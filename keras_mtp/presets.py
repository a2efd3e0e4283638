"""Pretrained models: keras-hub presets in, keras-hub presets out.

`MTPCausalLM.from_preset` builds the backbone and its preprocessor with
keras-hub's own `from_preset` (a built-in name, `kaggle://`, `hf://` or a local
directory), then the MTP depths: loaded from the preset when it has them,
freshly initialized otherwise. `save_to_preset` writes keras-hub's preset
(`config.json`, `model.weights.h5`, the preprocessor and tokenizer files), so
plain keras-hub still loads the trunk, plus two files of ours:

- `mtp.json`: the MTP settings (`mtp_num_layers`, the current `λ`, ...);
- `mtp.weights.h5`: one dataset per MTP weight, named by its path below the
  MTP block (`mtp_layer_1/projection/kernel`, ...).

A preset whose saved depth count differs from the `mtp_num_layers` asked for
loads its first `min(saved, asked)` depths (depth `k` reads only depths
`< k`, so a prefix of the chain is a valid chain) and initializes the rest.
The MTP settings `from_preset` is not given come from `mtp.json`; one given,
None included, is the constructor's.

Saving into a directory that holds a preset replaces the files the save
writes, as keras-hub's own savers do, and leaves every other file alone; a
model without MTP depths removes an `mtp.weights.h5` an earlier save left
there (its `mtp.json` then lists 0 depths, and loading reads no more depths
than `mtp.json` lists), so the directory describes exactly the model saved.
"""

import json
import os

import keras
import numpy as np

from keras_mtp import distribution
from keras_mtp import hf_config
from keras_mtp import hf_mtp
from keras_mtp import hf_tokenizer

MTP_CONFIG_FILE = "mtp.json"
MTP_WEIGHTS_FILE = "mtp.weights.h5"
# Saved in mtp.json; `from_preset` arguments override them.
_SETTINGS = (
    "mtp_num_layers",
    "mtp_loss_scaling_factor",
    "mtp_detach_trunk",
    "loss_chunk_size",
    "mtp_targets",
    "draft_vocabulary",
)


def _preset_file(preset, name):
    """The local path of the preset's file `name`, or None if it has none.

    keras-hub's own resolution, so any handle its `from_preset` takes works
    (a download from a hub is cached by keras-hub)."""
    from keras_hub.src.utils import preset_utils

    if not preset_utils.check_file_exists(preset, name):
        return None
    return preset_utils.get_file(preset, name)


def _load_preprocessor(preset):
    import keras_hub

    try:
        preprocessor = keras_hub.models.CausalLMPreprocessor.from_preset(preset)
    except (ValueError, FileNotFoundError) as error:  # a backbone only
        print(f"keras_mtp: no preprocessor in {preset!r} ({error})")
        return None
    # A Hugging Face checkpoint's ids are those of its tokenizer.json.
    return hf_tokenizer.exact_preprocessor(preprocessor, preset)


def from_preset(cls, preset, load_weights=True, **kwargs):
    """`MTPCausalLM.from_preset`; see its docstring."""
    # Under a distribution each weight is created with its layout; the
    # values read from the files are staged in host memory, so no
    # accelerator holds a whole weight first.
    with distribution.stage_on_host():
        return _from_preset(cls, preset, load_weights, **kwargs)


def _from_preset(cls, preset, load_weights, **kwargs):
    import keras_hub

    saved = {}
    config_path = _preset_file(preset, MTP_CONFIG_FILE)
    if config_path is not None:
        with open(config_path) as f:
            saved = json.load(f)
    for key in _SETTINGS:
        # Only a setting not given comes from the preset: one given, None
        # included, means what it means to the constructor.
        if key not in kwargs and key in saved:
            kwargs[key] = saved[key]
    # Fresh depths on a pretrained trunk start as the main head (a random
    # depth starts above log V through the shared head); loaded depths
    # overwrite it.
    kwargs.setdefault("mtp_init", "identity" if load_weights else "random")
    if "backbone" not in kwargs:
        kwargs["backbone"] = keras_hub.models.Backbone.from_preset(
            preset,
            load_weights=load_weights,
            **hf_config.backbone_kwargs(preset),
        )
    if "preprocessor" not in kwargs:
        kwargs["preprocessor"] = _load_preprocessor(preset)
    model = cls(**kwargs)
    depths = model.mtp_num_layers
    if not depths:
        return model
    loaded, source = 0, f"loaded from {preset!r}"
    weights_path = _preset_file(preset, MTP_WEIGHTS_FILE)
    if load_weights and weights_path is not None:
        loaded = load_mtp_weights(
            model, weights_path, saved.get("mtp_num_layers")
        )
    elif load_weights and hf_mtp.takes_hf_mtp(model.backbone):
        # A Hugging Face Qwen3.5 checkpoint's own trained MTP layer.
        if hf_mtp.has_hf_mtp(preset):
            loaded = hf_mtp.load_hf_mtp_weights(model, preset)
            source = f"loaded from the `mtp.*` tensors of {preset!r}"
    if not loaded:
        source = "freshly initialized"
    message = f"keras_mtp: MTP depths 1-{loaded} {source}"
    if loaded == 0:
        message = f"keras_mtp: {depths} MTP depth(s) {source}"
    elif loaded < depths:
        message += f", depths {loaded + 1}-{depths} freshly initialized"
    saved_depths = saved.get("mtp_num_layers", 0)
    if load_weights and saved_depths > depths:
        message += f" (the preset's depths {depths + 1}-{saved_depths} unused)"
    print(message)
    return model


def _depth_weights(model):
    """`{key: variable}` of every MTP weight, keyed below the block."""
    block = model.mtp_block
    prefix = block.path + "/"
    weights = {}
    for layer in block.mtp_layers:
        for variable in layer.weights:
            assert variable.path.startswith(prefix), variable.path
            weights[variable.path[len(prefix) :]] = variable
    return weights


def load_mtp_weights(model, path, saved_depths=None):
    """Assigns the depths saved in the `mtp.weights.h5` at `path` (up to
    the model's own count, and to `saved_depths`, the count its `mtp.json`
    lists, when given); returns how many depths were loaded."""
    import h5py

    weights = _depth_weights(model)
    with h5py.File(path, "r") as f:
        saved = {}
        f.visititems(
            lambda name, item: (
                saved.__setitem__(name, item[()])
                if isinstance(item, h5py.Dataset)
                else None
            )
        )
    depths = {int(key.split("/")[0].rsplit("_", 1)[1]) for key in saved}
    loaded = 0
    wanted = model.mtp_num_layers
    if saved_depths is not None:
        wanted = min(wanted, saved_depths)
    for k in range(1, wanted + 1):
        if k not in depths:
            break
        keys = [key for key in weights if key.startswith(f"mtp_layer_{k}/")]
        missing = [key for key in keys if key not in saved]
        if missing:
            raise ValueError(
                f"The MTP weights in {path} do not fit this model: no "
                f"{missing[0]!r}. Saved: {sorted(saved)[:8]}"
            )
        for key in keys:
            variable, value = weights[key], saved[key]
            if tuple(variable.shape) != value.shape:
                raise ValueError(
                    f"The MTP weight {key!r} in {path} has shape "
                    f"{value.shape}, this model's {tuple(variable.shape)}"
                )
            variable.assign(value)
        loaded = k
    return loaded


def save_to_preset(model, preset_dir):
    """`MTPCausalLM.save_to_preset`; see its docstring."""
    import h5py

    os.makedirs(preset_dir, exist_ok=True)
    model.backbone.save_to_preset(preset_dir)
    if model.preprocessor is not None:
        model.preprocessor.save_to_preset(preset_dir)
    settings = {key: getattr(model, key) for key in _SETTINGS}
    settings["mtp_loss_scaling_factor"] = model.mtp_loss_scaling_factor
    if model.draft_vocabulary is not None:
        settings["draft_vocabulary"] = model.draft_vocabulary.tolist()
    with open(os.path.join(preset_dir, MTP_CONFIG_FILE), "w") as f:
        json.dump(settings, f, indent=2)
    weights_path = os.path.join(preset_dir, MTP_WEIGHTS_FILE)
    if model.mtp_block is None:
        # An earlier save's depths would describe another model.
        if os.path.exists(weights_path):
            os.remove(weights_path)
        return
    with h5py.File(weights_path, "w") as f:
        for key, variable in _depth_weights(model).items():
            f.create_dataset(
                key, data=np.asarray(keras.ops.convert_to_numpy(variable))
            )
