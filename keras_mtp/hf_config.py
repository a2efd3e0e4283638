"""What keras-hub's Hugging Face converters leave out of a backbone's config.

keras-hub 0.32 builds a backbone from a Hugging Face `config.json` through a
converter per `model_type`; the Llama and Gemma (1 and 2) converters drop
`rms_norm_eps`, so the backbone gets its constructor's default (1e-6).
SmolLM2 was trained with 1e-5: with the default its main logits differ from
transformers' by 0.04, with its own by 1e-4. `backbone_kwargs` returns the
arguments to pass to `Backbone.from_preset` so the backbone is the
checkpoint's.
"""

import json

# model_type -> {config.json key: backbone argument} that keras-hub drops.
DROPPED = {
    "llama": {"rms_norm_eps": "layer_norm_epsilon"},
    "gemma": {"rms_norm_eps": "layer_norm_epsilon"},
    "gemma2": {"rms_norm_eps": "layer_norm_epsilon"},
}


def hf_config(preset):
    """The preset's `config.json` if it is a Hugging Face checkpoint's (it has
    `model_type` and no `registered_name`, keras-hub's own test), else None."""
    from keras_hub.src.utils import preset_utils

    if not preset_utils.check_file_exists(preset, "config.json"):
        return None
    with open(preset_utils.get_file(preset, "config.json")) as f:
        config = json.load(f)
    if "registered_name" in config or "model_type" not in config:
        return None
    return config


def backbone_kwargs(preset):
    """The backbone arguments keras-hub's converter drops from the Hugging
    Face checkpoint `preset` (`{}` for a keras-hub preset)."""
    config = hf_config(preset)
    if config is None:
        return {}
    dropped = DROPPED.get(config["model_type"], {})
    return {
        argument: config[key]
        for key, argument in dropped.items()
        if key in config
    }
