"""Tiny Hugging Face checkpoints, as the Hub serves them, built here.

`build(directory, family)` writes `config.json` and `model.safetensors` (a
tiny transformers model with random weights) and the tokenizer files:
`tokenizer.json` (a byte-level BPE trained here with the `tokenizers`
library, with the family's own pre-tokenizer, special tokens and
post-processor) and `tokenizer_config.json`. keras-hub loads such a directory
through its Hugging Face converters, exactly as it loads `hf://` handles.

Needs transformers, torch and tokenizers; the tests that use it skip
without them.
"""

import glob
import json
import os
import sysconfig

from keras_mtp import gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 384


def stdlib_files(count, skip=0):
    """`count` Python source files of the standard library (its packages
    included, its tests and site-packages not), sorted by path: a fixed
    corpus on a given Python. A negative `skip` counts from the end."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(
        path
        for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if not any(
            part in ("site-packages", "test", "tests", "idlelib")
            for part in os.path.relpath(path, root).split(os.sep)
        )
    )
    start = skip if skip >= 0 else len(paths) + skip
    return paths[start : start + count]


def stdlib_texts(count, skip=0, chars=2000):
    texts = []
    for path in stdlib_files(count, skip):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read(chars))
    return texts


# Each family: its transformers config, its pre-tokenizer (a llama.cpp name
# known to `keras_mtp.gguf.pre_tokenizer`), whether its tokenizer adds a start
# token, and the start / end tokens its tokenizer_config.json names.
FAMILIES = {
    # SmolLM2: Llama architecture, SmolLM's pre-tokenizer, no start token.
    "smollm": dict(
        model_type="llama",
        pre="smollm",
        add_bos=False,
        bos="<|im_start|>",
        eos="<|im_end|>",
    ),
    # Llama 3: its own split rule, a start token added.
    "llama3": dict(
        model_type="llama",
        pre="llama-bpe",
        add_bos=True,
        bos="<|im_start|>",
        eos="<|endoftext|>",
    ),
    # Qwen 2 / 2.5: Llama 3's rule (Qwen's differs only in \p{N} vs
    # \p{N}{1,3}; not needed here), no start token.
    "qwen2": dict(
        model_type="qwen2",
        pre="llama-bpe",
        add_bos=False,
        bos=None,
        eos="<|endoftext|>",
    ),
    "qwen3": dict(
        model_type="qwen3",
        pre="llama-bpe",
        add_bos=False,
        bos=None,
        eos="<|im_end|>",
    ),
    "gpt2": dict(
        model_type="gpt2",
        pre="gpt-2",
        add_bos=False,
        bos="<|endoftext|>",
        eos="<|endoftext|>",
    ),
}


def train_tokenizer(family, vocab_size=VOCAB):
    """A byte-level BPE `tokenizers.Tokenizer` for `family`, trained on
    stdlib source files."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers import trainers

    spec = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = gguf.pre_tokenizer(spec["pre"])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(stdlib_texts(40, skip=-40), trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokenizer.token_to_id(bos))],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def model_config(family, vocab_size):
    import transformers

    spec = FAMILIES[family]
    common = dict(vocab_size=vocab_size, tie_word_embeddings=True)
    if spec["model_type"] == "gpt2":
        end = SPECIALS.index("<|endoftext|>")
        return transformers.GPT2Config(
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=256,
            bos_token_id=end,
            eos_token_id=end,
            **common,
        )
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[spec["model_type"]]
    return cls(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_theta=10000.0,
        **common,
    )


def build(directory, family, seed=0):
    """Writes a tiny Hugging Face checkpoint of `family` to `directory`;
    returns `directory`."""
    import torch
    import transformers

    spec = FAMILIES[family]
    tokenizer = train_tokenizer(family)
    vocab_size = tokenizer.get_vocab_size()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        model_config(family, vocab_size)
    )
    # Tiny random weights give near-uniform logits; larger ones make greedy
    # decoding and argmax comparisons meaningful.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 1:
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    tokenizer.model.save(directory)  # vocab.json, merges.txt (GPT-2 reads)
    config = {
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "pad_token": spec["eos"],
        "unk_token": None,
        "add_bos_token": spec["add_bos"],
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return directory
