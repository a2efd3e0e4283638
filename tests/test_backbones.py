"""Every supported keras-hub family (`keras_mtp.backbones.FAMILIES`): the MTP
block is a true copy of the right decoder layer and of the final norm, a model
trains, saves and loads, and keras-hub's own test harness passes."""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import BACKBONES
from conftest import fast_compilation
from conftest import make_backbone
from conftest import make_batch
from keras import ops
from keras_hub.src.tests import test_case

import keras_mtp
from keras_mtp import backbones

NAMES = list(BACKBONES)  # the registry's order
SUBLAYERS = ("transformer_block", "output_norm")

# The decoder layer each tiny config's MTP block copies: the last layer,
# except where layers alternate (the last full-attention one).
SOURCE = {
    "gpt_oss": 0,  # layer 1 is a sliding-window layer
    "qwen3_5": 1,  # layer 0 is a Gated DeltaNet (linear attention) layer
    "qwen3_5_moe": 1,
    "gemma4": 1,  # layer 0 is a sliding-window layer
}
# Tiny configs without a full-attention layer: the MTP block is the global
# variant of the last layer, checked against keras-hub's own global layer
# (a 6-layer Gemma3 builds one, its layer 5).
DERIVED = {"gemma3": dict(num_layers=6)}
MOE = {"qwen_moe", "qwen3_moe", "qwen3_5_moe", "mixtral", "gpt_oss"}


def np_(x):
    return ops.convert_to_numpy(x)


def skip_unsupported_backend(name):
    reason = backbones.family(name).skip_backends.get(keras.config.backend())
    if reason:
        pytest.skip(reason)


def config_without_name(layer):
    config = backbones.layer_config(layer)
    config.pop("name")
    return config


@pytest.mark.parametrize("name", NAMES)
def test_mtp_block_copies_the_right_decoder_layer_and_final_norm(name):
    skip_unsupported_backend(name)
    backbone = make_backbone(name)
    family = backbones.family(name)
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=1)
    layer = model.mtp_block.mtp_layers[0]
    index = backbones.block_source_index(backbone)
    assert index == SOURCE.get(name, len(backbone.transformer_layers) - 1)
    decoder = backbone.transformer_layers[index]
    if name in DERIVED:
        assert not family.full_attention(decoder)
        reference = backbones.tiny_backbone(name, **DERIVED[name])
        decoder = next(
            d
            for d in reversed(reference.transformer_layers)
            if family.full_attention(d)
        )
    copy = layer.transformer_block
    if family.full_attention is not None:
        assert family.full_attention(copy), name
    if name in MOE:
        assert any(
            "moe" in type(sublayer).__name__.lower()
            for sublayer in copy._flatten_layers()
        ), name
    originals = (decoder, backbones.final_norm(backbone))
    copies = (copy, layer.output_norm)
    x = np.random.default_rng(0).normal(size=(2, 12, 16)).astype("float32")
    mask = np.ones((2, 12), "int32")
    mask[1, 9:] = 0
    for original, copy in zip(originals, copies):
        assert type(copy) is type(original)
        assert copy is not original
        assert config_without_name(copy) == config_without_name(original)
        # Build the reference layer if needed (DERIVED: never called).
        backbones.call_decoder(originals[0], x, mask)
        assert [w.shape for w in copy.weights] == [
            w.shape for w in original.weights
        ]
        # New weights, same function: with the weights copied the outputs
        # agree, so the class and config really are the backbone's.
        copy.set_weights(original.get_weights())
    np.testing.assert_allclose(
        np_(backbones.call_decoder(copies[0], x, mask)),
        np_(backbones.call_decoder(originals[0], x, mask)),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np_(copies[1](x)), np_(originals[1](x)), atol=1e-6
    )


def test_variable_paths_are_unique_and_name_their_depth():
    for name in NAMES:
        model = keras_mtp.MTPCausalLM(make_backbone(name), mtp_num_layers=2)
        paths = [v.path for v in model.weights]
        assert len(set(paths)) == len(paths), name
        for k, layer in enumerate(model.mtp_block.mtp_layers, start=1):
            # SmolLM3's attention creates weights in its constructor, where
            # only `MTPLayer`'s own scope applies (see the registry).
            prefix = f"mtp_block/mtp_layer_{k}/"
            if not backbones.family(name).scoped_paths:
                prefix = f"{layer.name}/"
            for v in layer.weights:
                assert v.path.startswith(prefix) or v.path.startswith(
                    f"mtp_block/mtp_layer_{k}/"
                ), v.path


def test_moe_backbone_gets_moe_block_and_its_router_loss():
    model = keras_mtp.MTPCausalLM(make_backbone("qwen3_moe"), mtp_num_layers=1)
    x, _, _ = make_batch()
    model(x, training=True)
    names = [
        type(layer).__name__ for layer in model.mtp_block._flatten_layers()
    ]
    assert "Qwen3SparseMoeBlock" in names
    # λ·L_mtp, the backbone's router loss and the MTP block's router loss.
    assert len(model.losses) == 3


def test_registry_is_consistent():
    assert len(set(backbones.FAMILY_NAMES)) == len(backbones.FAMILIES)
    for family in backbones.FAMILIES:
        assert family.backbone_class is not None, family.backbone
        assert backbones.family(family.name) is family
        backbone = backbones.tiny_backbone(family.name)
        assert backbones.family(backbone) is family
        assert backbones.decoder_family(backbone.transformer_layers[-1])
        assert family.cache_layout in ("stacked", "per_layer", "hybrid")
        assert family.recurrent == (family.cache_layout == "hybrid")
    # Subclasses and aliases belong to their family.
    models = keras_hub.models
    tiny = {"vocabulary_size": 32, **backbones.family("llama").tiny}
    assert backbones.family(models.Llama3Backbone(**tiny)).name == "llama"
    assert models.SmolLMBackbone is models.SmolLM3Backbone
    assert models.Qwen2Backbone is models.QwenBackbone
    with pytest.raises(ValueError, match="Unknown backbone family 'bert'"):
        backbones.family("bert")
    for task in backbones.UNSUPPORTED:
        assert hasattr(models, task), task


def test_unsupported_backbones_raise_naming_them():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=32,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    with pytest.raises(ValueError, match="BertBackbone"):
        keras_mtp.MTPCausalLM(backbone)


class HarnessTest(test_case.TestCase):
    """keras-hub's own checks, run on our classes as on keras-hub's tasks."""

    test_session = None  # tf.test.TestCase's helper, not a test

    def init_kwargs(self, name):
        return {"backbone": make_backbone(name), "mtp_num_layers": 2}

    def test_model_serialization_and_saving(self):
        x, _, _ = make_batch()
        backend = keras.config.backend()
        for name in NAMES:
            family = backbones.family(name)
            if backend in family.skip_backends:
                continue
            if family.recurrent and backend == "jax":
                # keras-hub's harness calls the model eagerly: a minute of
                # op-by-op compilation for Qwen3.5's chunked Gated DeltaNet
                # on JAX (see test_fit_save_load_evaluate_...).
                self.run_serialization_test(
                    keras_mtp.MTPCausalLM(**self.init_kwargs(name))
                )
                continue
            with self.subTest(backbone=name):
                kwargs = self.init_kwargs(name)
                self.run_serialization_test(keras_mtp.MTPCausalLM(**kwargs))
                self.run_model_saving_test(
                    cls=keras_mtp.MTPCausalLM, init_kwargs=kwargs, input_data=x
                )

    def test_precision(self):
        x, _, _ = make_batch()
        self.run_precision_test(
            keras_mtp.MTPCausalLM, self.init_kwargs("llama"), x
        )

    def test_layer_and_block_serialization(self):
        backbone = make_backbone("gemma")
        layer = keras_mtp.MTPLayer(
            hidden_dim=16,
            transformer_block=backbone.transformer_layers[-1],
            output_norm=backbone.layer_norm,
        )
        self.run_serialization_test(layer)
        block = keras_mtp.MTPBlock(
            token_embedding=backbone.token_embedding,
            transformer_block=backbone.transformer_layers[-1],
            output_norm=backbone.layer_norm,
            num_layers=2,
            embedding_scale=4.0,
        )
        self.run_serialization_test(block)


def test_layer_and_block_config_round_trip_for_every_backbone():
    for name in NAMES:
        backbone = make_backbone(name)
        block = keras_mtp.MTPBlock(
            token_embedding=backbone.token_embedding,
            transformer_block=backbones.decoder_blueprint(backbone),
            output_norm=backbones.final_norm(backbone),
            num_layers=1,
        )
        config = block.get_config()
        revived = keras_mtp.MTPBlock.from_config(config)
        assert revived.get_config() == config
        layer = block.mtp_layers[0]
        assert (
            keras_mtp.MTPLayer.from_config(layer.get_config()).get_config()
            == layer.get_config()
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_fit_save_load_evaluate_and_continue_training(name, tmp_path):
    """A couple of MTP training steps, then `.keras` save and load: same
    predictions, same evaluated MTP losses, same training after."""
    skip_unsupported_backend(name)
    # Eagerly: for these few tiny steps, tracing and compiling each step
    # function (twice: the loaded model has its own) costs several times
    # more than running it. Graph and XLA training are the other test
    # files'; test_speculative runs each family in a graph or jitted.
    # On JAX, keras-hub's chunked Gated DeltaNet (Qwen3.5) is the
    # exception: op by op, JAX compiles each of the ~1000 ops of its 63-step
    # Python loop on its own (minutes with the gradient), so its steps are
    # compiled, with fewer XLA optimizations.
    compiled = backbones.family(name).recurrent and (
        keras.config.backend() == "jax"
    )
    with fast_compilation(compiled):
        fit_save_load_evaluate(name, tmp_path, compiled)


def fit_save_load_evaluate(name, tmp_path, compiled):
    x, y, w = make_batch(batch=8, pad_last=2)
    model = keras_mtp.MTPCausalLM(make_backbone(name), mtp_num_layers=2)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        jit_compile=compiled,
        run_eagerly=not compiled,
    )
    model.fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0)
    model.mtp_loss_scaling_factor = 0.3
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # compiled as saved
    assert type(loaded.backbone) is type(model.backbone)
    pair = (model, loaded)
    assert loaded.mtp_loss_scaling_factor == pytest.approx(0.3)
    if compiled:  # see above: op by op costs a minute
        predictions = [m.predict(x, batch_size=8, verbose=0) for m in pair]
    else:  # eagerly: no graph to trace
        predictions = [np_(m(x)) for m in pair]
    np.testing.assert_allclose(predictions[1], predictions[0], atol=1e-6)
    evaluated = [
        m.evaluate(
            x, y, sample_weight=w, batch_size=8, verbose=0, return_dict=True
        )
        for m in pair
    ]
    for key in ("mtp_loss_1", "mtp_loss_2", "main_loss", "loss"):
        assert evaluated[1][key] == pytest.approx(evaluated[0][key], abs=1e-6)
    if compiled:
        return  # one more compilation, of the loaded model's training step
    # The optimizer's state was saved too: training continues identically.
    for m in pair:
        m.fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(np_(a), np_(b), atol=1e-5)
