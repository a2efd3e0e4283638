"""Every supported keras-hub backbone: the MTP block is a true copy of the
backbone's last decoder layer, and keras-hub's own test harness passes."""

import keras
import numpy as np
import pytest
from conftest import BACKBONES
from conftest import make_backbone
from conftest import make_batch
from keras import ops
from keras_hub.src.tests import test_case

import keras_mtp
from keras_mtp import backbones

NAMES = sorted(BACKBONES)
SUBLAYERS = ("transformer_block", "output_norm")


def np_(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("name", NAMES)
def test_mtp_block_copies_last_decoder_and_final_norm(name):
    backbone = make_backbone(name)
    model = keras_mtp.MTPCausalLM(backbone, mtp_num_layers=1)
    layer = model.mtp_block.mtp_layers[0]
    originals = (backbone.transformer_layers[-1], backbone.layer_norm)
    copies = (layer.transformer_block, layer.output_norm)
    x = np.random.default_rng(0).normal(size=(2, 12, 16)).astype("float32")
    mask = np.ones((2, 12), "int32")
    mask[1, 9:] = 0
    for original, copy in zip(originals, copies):
        assert type(copy) is type(original)
        assert copy is not original
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
            for v in layer.weights:
                assert v.path.startswith(f"mtp_block/mtp_layer_{k}/"), v.path


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


class HarnessTest(test_case.TestCase):
    """keras-hub's own checks, run on our classes as on keras-hub's tasks."""

    test_session = None  # tf.test.TestCase's helper, not a test

    def init_kwargs(self, name):
        return {"backbone": make_backbone(name), "mtp_num_layers": 2}

    def test_model_serialization_and_saving(self):
        x, _, _ = make_batch()
        for name in NAMES:
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
            transformer_block=backbone.transformer_layers[-1],
            output_norm=backbone.layer_norm,
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
def test_save_load_then_training_continues_identically(name, tmp_path):
    x, y, w = make_batch(batch=8, pad_last=2)
    model = keras_mtp.MTPCausalLM(make_backbone(name), mtp_num_layers=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0)
    model.mtp_loss_scaling_factor = 0.3
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.mtp_loss_scaling_factor == pytest.approx(0.3)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    for m in (model, loaded):
        m.fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(np_(a), np_(b), atol=1e-5)
