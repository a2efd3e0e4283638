"""`keras_mtp.hf_mtp`: the `mtp.*` tensors of a Hugging Face Qwen3.5
checkpoint into MTP depth 1 and back.

Each test family gets a tiny checkpoint made here in HF's layout
(`config.json` with `text_config`, `model.safetensors` under HF names, random
`mtp.*` tensors) that keras-hub's own `Backbone.from_preset` loads. Nothing
downloads.
"""

import json
import os
import shutil
import types

import keras
import keras_hub
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save_file

import keras_mtp
from keras_mtp import backbones
from keras_mtp import hf_mtp

VOCAB = 32
# MoE sizes unlike d = 16, so a wrong transpose shows in shapes too (values
# catch the rest); the dense checkpoint has an lm_head, the MoE one ties it.
OVERRIDES = {
    "qwen3_5": dict(tie_word_embeddings=False),
    "qwen3_5_moe": dict(
        moe_intermediate_dim=8,
        shared_expert_intermediate_size=12,
        num_experts=3,
        tie_word_embeddings=True,
    ),
}
MTP = "mtp_block/mtp_layer_1/"
BLOCK = MTP + "transformer_block/"
ATTENTION = BLOCK + "self_attention/"
MOE = BLOCK + "sparse_moe_block/"


def linear(w, shape):
    return w.T


def heads(w, shape):
    return w.T.reshape(shape)


def copy(w, shape):  # a keras-hub Qwen3_5LayerNorm: x * (1 + w) itself
    return w


def one_plus(w, shape):  # a Keras RMSNormalization: x * scale
    return 1.0 + w


def experts(w, shape):
    return w.transpose(0, 2, 1)


# The spec, written out independently of `hf_mtp.MTP_TENSORS`: HF key ->
# (the Keras variable's path, its value from the HF tensor).
COMMON = {
    "mtp.fc.weight": (MTP + "projection/kernel", linear),
    "mtp.pre_fc_norm_embedding.weight": (
        MTP + "embedding_norm/scale",
        one_plus,
    ),
    "mtp.pre_fc_norm_hidden.weight": (MTP + "hidden_norm/scale", one_plus),
    "mtp.norm.weight": (MTP + "output_norm/scale", copy),
    "mtp.layers.0.input_layernorm.weight": (
        BLOCK + "input_layernorm/scale",
        copy,
    ),
    "mtp.layers.0.post_attention_layernorm.weight": (
        BLOCK + "post_attention_layernorm/scale",
        copy,
    ),
    "mtp.layers.0.self_attn.q_proj.weight": (ATTENTION + "query/kernel", heads),
    "mtp.layers.0.self_attn.k_proj.weight": (ATTENTION + "key/kernel", heads),
    "mtp.layers.0.self_attn.v_proj.weight": (ATTENTION + "value/kernel", heads),
    "mtp.layers.0.self_attn.o_proj.weight": (
        ATTENTION + "attention_output/kernel",
        heads,
    ),
    "mtp.layers.0.self_attn.q_norm.weight": (
        ATTENTION + "query_norm/scale",
        copy,
    ),
    "mtp.layers.0.self_attn.k_norm.weight": (
        ATTENTION + "key_norm/scale",
        copy,
    ),
}
SPEC = {
    "qwen3_5": {
        **COMMON,
        "mtp.layers.0.mlp.gate_proj.weight": (
            BLOCK + "feedforward_gate_dense/kernel",
            linear,
        ),
        "mtp.layers.0.mlp.up_proj.weight": (
            BLOCK + "feedforward_intermediate_dense/kernel",
            linear,
        ),
        "mtp.layers.0.mlp.down_proj.weight": (
            BLOCK + "feedforward_output_dense/kernel",
            linear,
        ),
    },
    "qwen3_5_moe": {
        **COMMON,
        "mtp.layers.0.mlp.gate.weight": (MOE + "router_gate/kernel", linear),
        "mtp.layers.0.mlp.experts.gate_up_proj": (
            MOE + "experts/expert_feedforward_gate_dense",
            experts,
        ),
        "mtp.layers.0.mlp.experts.down_proj": (
            MOE + "experts/expert_feedforward_output_dense",
            experts,
        ),
        "mtp.layers.0.mlp.shared_expert.gate_proj.weight": (
            MOE + "shared_expert/feedforward_gate_dense/kernel",
            linear,
        ),
        "mtp.layers.0.mlp.shared_expert.up_proj.weight": (
            MOE + "shared_expert/feedforward_intermediate_dense/kernel",
            linear,
        ),
        "mtp.layers.0.mlp.shared_expert.down_proj.weight": (
            MOE + "shared_expert/feedforward_output_dense/kernel",
            linear,
        ),
        "mtp.layers.0.mlp.shared_expert_gate.weight": (
            MOE + "shared_expert_gate/kernel",
            linear,
        ),
    },
}


def hf_config(backbone, moe):
    """`config.json` as Hugging Face writes Qwen3.5's (what keras-hub's
    `convert_backbone_config` reads)."""
    text = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "vocab_size": backbone.vocabulary_size,
        "hidden_size": backbone.hidden_dim,
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads,
        "head_dim": backbone.head_dim,
        "rms_norm_eps": backbone.layer_norm_epsilon,
        "hidden_act": "silu",
        "attn_output_gate": True,
        "tie_word_embeddings": backbone.tie_word_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": backbone.rope_max_wavelength,
            "partial_rotary_factor": backbone.partial_rotary_factor,
        },
        "layer_types": backbone.layer_types,
        "linear_num_key_heads": backbone.linear_num_key_heads,
        "linear_num_value_heads": backbone.linear_num_value_heads,
        "linear_key_head_dim": backbone.linear_key_head_dim,
        "linear_value_head_dim": backbone.linear_value_head_dim,
        "linear_conv_kernel_dim": backbone.linear_conv_kernel_dim,
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
    }
    if moe:
        text.update(
            moe_intermediate_size=backbone.moe_intermediate_dim,
            shared_expert_intermediate_size=(
                backbone.shared_expert_intermediate_size
            ),
            num_experts=backbone.num_experts,
            num_experts_per_tok=backbone.top_k,
        )
    else:
        text["intermediate_size"] = backbone.intermediate_dim
    name = "Qwen3_5Moe" if moe else "Qwen3_5"
    return {
        "architectures": [f"{name}ForConditionalGeneration"],
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "tie_word_embeddings": backbone.tie_word_embeddings,
        "text_config": text,
    }


def numpy_value(variable):
    return keras.ops.convert_to_numpy(variable).astype("float32")


def attribute(layer, path):
    for name in path.split("."):
        layer = getattr(layer, name)
    return layer


# keras-hub's convert_qwen3_5.py, Gated DeltaNet layers (not in MTP).
GATED_DELTA_NET = (
    ("linear_attn.in_proj_qkv.weight", "in_proj_qkv.kernel", np.transpose),
    ("linear_attn.in_proj_z.weight", "in_proj_z.kernel", np.transpose),
    ("linear_attn.in_proj_b.weight", "in_proj_b.kernel", np.transpose),
    ("linear_attn.in_proj_a.weight", "in_proj_a.kernel", np.transpose),
    ("linear_attn.conv1d.weight", "conv1d_weight", lambda k: k[:, None, :]),
    ("linear_attn.dt_bias", "dt_bias", np.asarray),
    ("linear_attn.A_log", "A_log", np.asarray),
    ("linear_attn.norm.weight", "norm.scale", np.asarray),
    ("linear_attn.out_proj.weight", "out_proj.kernel", np.transpose),
)


def main_tensors(backbone, moe):
    """The main model under HF names. Decoder layers go through
    `hf_mtp.MTP_TENSORS`' `layers.0.` rows (the MTP layer is named like the
    main layers), so keras-hub's converter loading them back checks those
    rows against keras-hub's own mapping."""
    embedding = backbone.token_embedding
    prefix = "model.language_model."
    tensors = {
        prefix + "embed_tokens.weight": numpy_value(embedding.embeddings),
        prefix + "norm.weight": numpy_value(
            backbone.get_layer("sequence_output_layernorm").scale
        ),
    }
    if not backbone.tie_word_embeddings:
        tensors["lm_head.weight"] = numpy_value(embedding.reverse_embeddings).T
    kind = "moe" if moe else "dense"
    for i, layer in enumerate(backbone.transformer_layers):
        name = f"{prefix}layers.{i}."
        for key, path, transform, mlp in hf_mtp.MTP_TENSORS:
            if not key.startswith("layers.0.") or mlp not in (None, kind):
                continue
            key = key.removeprefix("layers.0.")
            full = layer.layer_type == "full_attention"
            if key.startswith("self_attn.") and not full:
                continue
            variable = attribute(layer, path.removeprefix("transformer_block."))
            tensors[name + key] = transform.to_hf(numpy_value(variable))
        if layer.layer_type == "linear_attention":
            for key, path, to_hf in GATED_DELTA_NET:
                variable = attribute(layer._linear_attn, path)
                tensors[name + key] = to_hf(numpy_value(variable))
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def mtp_shapes(config):
    """The HF shapes of the `mtp.*` tensors, from `config.json` alone (the
    modules of vLLM's qwen3_5_mtp.py)."""
    c = config["text_config"]
    d, h = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * h, c["num_key_value_heads"] * h
    layer = "mtp.layers.0."
    shapes = {
        "mtp.fc.weight": (d, 2 * d),
        "mtp.pre_fc_norm_embedding.weight": (d,),
        "mtp.pre_fc_norm_hidden.weight": (d,),
        "mtp.norm.weight": (d,),
        layer + "input_layernorm.weight": (d,),
        layer + "post_attention_layernorm.weight": (d,),
        layer + "self_attn.q_proj.weight": (2 * q, d),  # query and gate
        layer + "self_attn.k_proj.weight": (kv, d),
        layer + "self_attn.v_proj.weight": (kv, d),
        layer + "self_attn.o_proj.weight": (d, q),
        layer + "self_attn.q_norm.weight": (h,),
        layer + "self_attn.k_norm.weight": (h,),
    }
    mlp = layer + "mlp."
    if "num_experts" in c:
        e, i = c["num_experts"], c["moe_intermediate_size"]
        s = c["shared_expert_intermediate_size"]
        shapes.update(
            {
                mlp + "gate.weight": (e, d),
                mlp + "experts.gate_up_proj": (e, 2 * i, d),
                mlp + "experts.down_proj": (e, d, i),
                mlp + "shared_expert.gate_proj.weight": (s, d),
                mlp + "shared_expert.up_proj.weight": (s, d),
                mlp + "shared_expert.down_proj.weight": (d, s),
                mlp + "shared_expert_gate.weight": (1, d),
            }
        )
    else:
        i = c["intermediate_size"]
        shapes.update(
            {
                mlp + "gate_proj.weight": (i, d),
                mlp + "up_proj.weight": (i, d),
                mlp + "down_proj.weight": (d, i),
            }
        )
    return shapes


def random_mtp_tensors(config, seed=1):
    """Random `mtp.*` tensors on a 2**-12 grid, where `1 + w` is exact in
    float32 (so the round trip can be compared exactly)."""
    rng = np.random.default_rng(seed)
    return {
        key: np.round(rng.normal(0.0, 0.2, shape) * 4096) / 4096
        for key, shape in mtp_shapes(config).items()
    }


def write_checkpoint(directory, config, tensors):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return str(directory)


@pytest.fixture(scope="module", params=sorted(OVERRIDES))
def ckpt(request, tmp_path_factory):
    """A tiny HF Qwen3.5 checkpoint with MTP tensors, keras-hub's backbone
    loaded from it and an `MTPCausalLM(mtp_num_layers=1)` over it."""
    name = request.param
    moe = name == "qwen3_5_moe"
    keras.utils.set_random_seed(0)
    source = backbones.tiny_backbone(
        name, vocabulary_size=VOCAB, **OVERRIDES[name]
    )
    config = hf_config(source, moe)
    main = main_tensors(source, moe)
    mtp = {
        k: v.astype("float32") for k, v in random_mtp_tensors(config).items()
    }
    directory = write_checkpoint(
        tmp_path_factory.mktemp(name), config, {**main, **mtp}
    )
    backbone = keras_hub.models.Backbone.from_preset(directory)
    return types.SimpleNamespace(
        name=name,
        moe=moe,
        dir=directory,
        config=config,
        source=source,
        main=main,
        mtp=mtp,
        backbone=backbone,
        model=keras_mtp.MTPCausalLM(backbone, mtp_num_layers=1),
    )


def depth_1_values(model):
    return {
        v.path: numpy_value(v) for v in model.mtp_block.mtp_layers[0].weights
    }


def test_keras_hub_loads_the_hf_checkpoint(ckpt):
    # The decoder rows of hf_mtp.MTP_TENSORS agree with keras-hub's
    # converter: the backbone comes back exactly.
    assert type(ckpt.backbone) is type(ckpt.source)
    assert len(ckpt.backbone.weights) == len(ckpt.source.weights)
    for loaded, original in zip(ckpt.backbone.weights, ckpt.source.weights):
        assert loaded.path == original.path
        np.testing.assert_array_equal(
            numpy_value(loaded), numpy_value(original), err_msg=loaded.path
        )
    if not ckpt.moe:  # ... and with keras-hub's exporter, key by key
        from keras_hub.src.utils.transformers.export.qwen3_5 import (
            get_qwen3_5_weights_map,
        )

        exported = get_qwen3_5_weights_map(ckpt.source, include_lm_head=True)
        assert set(exported) == set(ckpt.main)
        for key, value in exported.items():
            np.testing.assert_array_equal(
                numpy_value(value), ckpt.main[key], err_msg=key
            )


def test_load_puts_every_mtp_tensor_in_its_variable(ckpt):
    spec = SPEC[ckpt.name]
    assert set(spec) == set(ckpt.mtp)  # the file has exactly these
    assert hf_mtp.has_hf_mtp(ckpt.dir)
    model = keras_mtp.MTPCausalLM(ckpt.backbone, mtp_num_layers=1)
    before = depth_1_values(model)
    assert hf_mtp.load_hf_mtp_weights(model, ckpt.dir) == 1
    after = depth_1_values(model)
    # Every variable of depth 1 is some tensor's, and only one tensor's.
    assert sorted(path for path, _ in spec.values()) == sorted(after)
    for key, (path, to_keras) in spec.items():
        expected = to_keras(ckpt.mtp[key], after[path].shape)
        np.testing.assert_array_equal(after[path], expected, err_msg=key)
        assert not np.array_equal(before[path], after[path]), key
    # The module's own table says the same.
    rows = {k: v.path for k, v, _ in hf_mtp.hf_mtp_variables(model)}
    assert rows == {k: path for k, (path, _) in spec.items()}


def read_all(path):
    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_save_round_trip(ckpt, tmp_path):
    hf_mtp.load_hf_mtp_weights(ckpt.model, ckpt.dir)
    loaded = depth_1_values(ckpt.model)

    # No HF export there: a standalone mtp.safetensors.
    path = hf_mtp.save_hf_mtp_weights(ckpt.model, str(tmp_path / "alone"))
    assert os.path.basename(path) == "mtp.safetensors"
    assert_same_tensors(load_file(path), ckpt.mtp)

    # Next to an export: merged into its model.safetensors, the rest as is.
    merged = str(tmp_path / "merged")
    shutil.copytree(ckpt.dir, merged)
    path = hf_mtp.save_hf_mtp_weights(ckpt.model, merged)
    assert path == os.path.join(merged, "model.safetensors")
    tensors, metadata = read_all(path)
    assert_same_tensors(tensors, {**ckpt.main, **ckpt.mtp})
    assert metadata == {"format": "pt"}

    # A sharded export: a new mtp.safetensors shard the index lists.
    sharded = str(tmp_path / "sharded")
    os.makedirs(sharded)
    shutil.copy(os.path.join(ckpt.dir, "config.json"), sharded)
    everything = {**ckpt.main, **ckpt.mtp}
    keys = sorted(everything)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2]}
    shards["model-00002-of-00002.safetensors"] = keys[len(keys) // 2 :]
    for shard, shard_keys in shards.items():
        save_file(
            {k: everything[k] for k in shard_keys},
            os.path.join(sharded, shard),
        )
    total = sum(v.nbytes for v in everything.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: s for s, ks in shards.items() for k in ks},
    }
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    path = hf_mtp.save_hf_mtp_weights(ckpt.model, sharded)
    assert path == os.path.join(sharded, "mtp.safetensors")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == total  # same float32 sizes
    shard_of = {k: s for s, ks in shards.items() for k in ks}
    assert index["weight_map"] == {
        k: "mtp.safetensors" if k in ckpt.mtp else shard_of[k]
        for k in everything
    }
    assert_same_tensors(load_file(path), ckpt.mtp)

    # Each of the three loads back to the same variables.
    for directory in ("alone", "merged", "sharded"):
        model = keras_mtp.MTPCausalLM(ckpt.backbone, mtp_num_layers=1)
        assert hf_mtp.load_hf_mtp_weights(model, str(tmp_path / directory))
        for path, value in depth_1_values(model).items():
            np.testing.assert_array_equal(value, loaded[path], err_msg=path)


def test_norm_round_trip_is_within_half_an_ulp(ckpt, tmp_path):
    # Any float32 `w`: `1 + w` rounds, by at most 2**-24 on [1, 2).
    rng = np.random.default_rng(2)
    mtp = {k: v.copy() for k, v in ckpt.mtp.items()}
    for key in (
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.pre_fc_norm_hidden.weight",
    ):
        mtp[key] = rng.uniform(0.0, 0.5, mtp[key].shape).astype("float32")
    directory = write_checkpoint(tmp_path / "ckpt", ckpt.config, mtp)
    hf_mtp.load_hf_mtp_weights(ckpt.model, directory)
    saved = load_file(hf_mtp.save_hf_mtp_weights(ckpt.model, tmp_path / "out"))
    for key in mtp:
        np.testing.assert_allclose(saved[key], mtp[key], rtol=0, atol=2**-24)


def test_bfloat16_checkpoint_round_trip(ckpt, tmp_path):
    # Released checkpoints are bfloat16: exact into float32 variables and
    # back, for every |w| >= 2**-16 (or 0).
    rng = np.random.default_rng(3)
    mtp = {}
    for key, value in ckpt.mtp.items():
        w = rng.normal(0.0, 0.2, value.shape).astype(ml_dtypes.bfloat16)
        mtp[key] = np.where(np.abs(w) < 2**-16, 0, w).astype(w.dtype)
    directory = write_checkpoint(tmp_path / "ckpt", ckpt.config, mtp)
    hf_mtp.load_hf_mtp_weights(ckpt.model, directory)
    path = hf_mtp.save_hf_mtp_weights(
        ckpt.model, tmp_path / "out", dtype="bfloat16"
    )
    assert_same_tensors(load_file(path), mtp)


def test_per_expert_moe_layout(ckpt, tmp_path):
    if not ckpt.moe:
        pytest.skip("MoE only")
    # vLLM and keras-hub also read the experts one by one.
    mtp = {k: v for k, v in ckpt.mtp.items() if ".experts." not in k}
    stem = "mtp.layers.0.mlp.experts."
    gate_up, down = (
        ckpt.mtp[stem + "gate_up_proj"],
        ckpt.mtp[stem + "down_proj"],
    )
    for j in range(len(gate_up)):
        gate, up = np.split(gate_up[j], 2)
        mtp[f"{stem}{j}.gate_proj.weight"] = gate
        mtp[f"{stem}{j}.up_proj.weight"] = up
        mtp[f"{stem}{j}.down_proj.weight"] = down[j]
    directory = write_checkpoint(tmp_path / "ckpt", ckpt.config, mtp)
    hf_mtp.load_hf_mtp_weights(ckpt.model, ckpt.dir)
    fused = depth_1_values(ckpt.model)
    keras.utils.set_random_seed(5)
    model = keras_mtp.MTPCausalLM(ckpt.backbone, mtp_num_layers=1)
    assert hf_mtp.load_hf_mtp_weights(model, directory) == 1
    for path, value in depth_1_values(model).items():
        np.testing.assert_array_equal(value, fused[path], err_msg=path)
    path = hf_mtp.save_hf_mtp_weights(model, tmp_path / "out", per_expert=True)
    assert_same_tensors(
        load_file(path), {k: v.astype("float32") for k, v in mtp.items()}
    )


def rms_norm_1_plus_w(x, w, epsilon):
    """`Qwen3_5RMSNorm` (transformers, vLLM's GemmaRMSNorm): (1 + w)."""
    x = x.astype("float64")
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + epsilon) * (1 + w)


def test_depth_1_is_vllm_forward(ckpt):
    """Depth 1 with the loaded weights against vLLM's Qwen3_5 MTP forward in
    NumPy on the checkpoint's tensors; the decoder layer is the Keras block
    itself, fed the same input."""
    model, hf = ckpt.model, {**ckpt.main, **ckpt.mtp}
    hf_mtp.load_hf_mtp_weights(model, ckpt.dir)
    eps = ckpt.config["text_config"]["rms_norm_eps"]
    rng = np.random.default_rng(4)
    ids = rng.integers(1, VOCAB, (2, 10)).astype("int32")
    mask = np.ones_like(ids)
    next_ids = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], 1)
    # h_i: any hidden state (the trunk's forward is not under test).
    d = ckpt.config["text_config"]["hidden_size"]
    hidden = rng.normal(0.0, 1.0, ids.shape + (d,)).astype("float32")
    layer = model.mtp_block.mtp_layers[0]
    embedding = model.backbone.token_embedding

    # keras_mtp: MTPLayer depth 1, then the shared head.
    _, normed = layer(hidden, embedding(next_ids), mask)
    logits = numpy_value(embedding(normed, reverse=True))

    # vLLM: fc(cat([pre_fc_norm_embedding(embed(x[i+1])),
    #               pre_fc_norm_hidden(h_i)])) -> layers[0] -> norm -> lm_head
    h = hidden
    embed = hf["model.language_model.embed_tokens.weight"]
    head = hf.get("lm_head.weight", embed)  # the MoE checkpoint ties them
    e = rms_norm_1_plus_w(
        embed[next_ids], hf["mtp.pre_fc_norm_embedding.weight"], eps
    )
    h_normed = rms_norm_1_plus_w(h, hf["mtp.pre_fc_norm_hidden.weight"], eps)
    u = np.concatenate([e, h_normed], -1) @ hf["mtp.fc.weight"].T
    block = backbones.call_decoder(
        layer.transformer_block, u.astype("float32"), mask
    )
    out = rms_norm_1_plus_w(numpy_value(block), hf["mtp.norm.weight"], eps)
    expected = out @ head.T
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    # And the MTP block's depth-1 loss is vLLM's draft cross-entropy
    # against x[i + 2].
    losses = model.mtp_block(hidden, ids, mask)["losses"]
    z = expected[:, :-2]
    log_z = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1))
    log_z = log_z + z.max(-1)
    target = np.take_along_axis(z, ids[:, 2:, None], -1)[..., 0]
    np.testing.assert_allclose(
        numpy_value(losses)[0], np.mean(log_z - target), rtol=1e-5
    )


def broken_copy(ckpt, tmp_path, edit):
    tensors = {**ckpt.main, **ckpt.mtp}
    edit(tensors)
    return write_checkpoint(tmp_path / "broken", ckpt.config, tensors)


def test_errors_name_the_key(ckpt, tmp_path):
    key = "mtp.layers.0.self_attn.k_proj.weight"
    before = depth_1_values(ckpt.model)

    directory = broken_copy(ckpt, tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"no tensor `{key}`"):
        hf_mtp.load_hf_mtp_weights(ckpt.model, directory)

    def transpose(t):
        t[key] = t[key].T

    directory = broken_copy(ckpt, tmp_path, transpose)
    with pytest.raises(ValueError, match=f"`{key}` .* has shape"):
        hf_mtp.load_hf_mtp_weights(ckpt.model, directory)

    def extra(t):
        t["mtp.layers.1.input_layernorm.weight"] = t["mtp.norm.weight"]

    directory = broken_copy(ckpt, tmp_path, extra)
    with pytest.raises(ValueError, match="mtp.layers.1.input_layernorm"):
        hf_mtp.load_hf_mtp_weights(ckpt.model, directory)
    # Nothing was assigned by the refused loads.
    for path, value in depth_1_values(ckpt.model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)

    directory = broken_copy(
        ckpt, tmp_path, lambda t: [t.pop(k) for k in ckpt.mtp]
    )
    assert not hf_mtp.has_hf_mtp(directory)
    assert hf_mtp.load_hf_mtp_weights(ckpt.model, directory) == 0


def test_index_listing_a_tensor_its_shard_lacks_names_the_key(ckpt, tmp_path):
    # A sharded checkpoint whose index promises an `mtp.*` tensor that its
    # shard does not hold: a ValueError naming the key and the shard, before
    # anything is assigned.
    key = "mtp.layers.0.self_attn.k_proj.weight"
    before = depth_1_values(ckpt.model)
    directory = tmp_path / "sharded"
    os.makedirs(directory)
    shutil.copy(os.path.join(ckpt.dir, "config.json"), directory)
    shards = {
        "model-00001-of-00002.safetensors": ckpt.main,
        "model-00002-of-00002.safetensors": {
            k: v for k, v in ckpt.mtp.items() if k != key
        },
    }
    for shard, tensors in shards.items():
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(tensors, str(directory / shard))
    weight_map = dict.fromkeys(ckpt.main, "model-00001-of-00002.safetensors")
    weight_map.update(
        dict.fromkeys(ckpt.mtp, "model-00002-of-00002.safetensors")
    )
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    message = f"lists `{key}` in model-00002-of-00002.safetensors"
    with pytest.raises(ValueError, match=message):
        hf_mtp.load_hf_mtp_weights(ckpt.model, str(directory))
    for path, value in depth_1_values(ckpt.model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_refuses_other_families():
    backbone = backbones.tiny_backbone("llama", vocabulary_size=VOCAB)
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=1)
    with pytest.raises(ValueError, match="LlamaBackbone.*'llama'"):
        hf_mtp.load_hf_mtp_weights(model, "unused")
    with pytest.raises(ValueError, match="LlamaBackbone.*'llama'"):
        hf_mtp.save_hf_mtp_weights(model, "unused")


def test_from_preset_loads_the_checkpoints_mtp_layer(ckpt, capsys):
    # The user's call: `from_preset` on the HF checkpoint (a local
    # directory here, "hf://Qwen/..." where downloads are possible).
    model = keras_mtp.MTPCausalLM.from_preset(
        ckpt.dir, mtp_num_layers=2, preprocessor=None
    )
    out = capsys.readouterr().out
    assert "MTP depths 1-1 loaded from the `mtp.*` tensors" in out, out
    assert "depths 2-2 freshly initialized" in out, out
    direct = keras_mtp.MTPCausalLM(ckpt.backbone, mtp_num_layers=1)
    assert hf_mtp.load_hf_mtp_weights(direct, ckpt.dir) == 1
    expected = [numpy_value(v) for v in direct.mtp_block.mtp_layers[0].weights]
    loaded = [numpy_value(v) for v in model.mtp_block.mtp_layers[0].weights]
    for a, b in zip(loaded, expected):
        np.testing.assert_array_equal(a, b)


def test_export_to_transformers_carries_the_mtp_layer(tmp_path, capsys):
    # keras-hub exports Qwen3_5Backbone (dense) only; untied heads lose
    # `lm_head` in keras-hub 0.32's export, so the trunk here is tied.
    keras.utils.set_random_seed(3)
    backbone = backbones.tiny_backbone(
        "qwen3_5", vocabulary_size=VOCAB, tie_word_embeddings=True
    )
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=1)
    for v in model.mtp_block.mtp_layers[0].weights:  # not the initial ones
        v.assign(np.random.default_rng(0).normal(size=v.shape) * 0.1 + 1)
    path = str(tmp_path / "hf")
    model.export_to_transformers(path)
    capsys.readouterr()
    loaded = keras_mtp.MTPCausalLM.from_preset(path, preprocessor=None)
    assert "loaded from the `mtp.*` tensors" in capsys.readouterr().out
    for a, b in zip(
        model.mtp_block.mtp_layers[0].weights,
        loaded.mtp_block.mtp_layers[0].weights,
    ):
        np.testing.assert_allclose(
            numpy_value(b), numpy_value(a), atol=1e-6, err_msg=a.path
        )
    x = {
        "token_ids": np.arange(1, 9, dtype="int32")[None] % VOCAB,
        "padding_mask": np.ones((1, 8), "int32"),
    }
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)),
        keras.ops.convert_to_numpy(model(x)),
        atol=1e-5,
    )
