"""keras_mtp: DeepSeek-V3 Multi-Token Prediction for Keras 3 language models."""

from keras_mtp import backbones
from keras_mtp import callbacks
from keras_mtp import checkpoint
from keras_mtp import distribution
from keras_mtp import ops
from keras_mtp import report
from keras_mtp.losses import SparseCrossEntropy
from keras_mtp.mtp_block import MTPBlock
from keras_mtp.mtp_causal_lm import MTPCausalLM
from keras_mtp.mtp_layer import MTPLayer

__version__ = "0.1.0"

__all__ = [
    "MTPBlock",
    "MTPCausalLM",
    "MTPLayer",
    "SparseCrossEntropy",
    "backbones",
    "callbacks",
    "checkpoint",
    "distribution",
    "ops",
    "report",
]
