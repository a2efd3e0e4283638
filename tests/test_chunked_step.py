"""With `loss_chunk_size`, no tensor of `(B, T, V)` elements is made in a
training or evaluation step, on any backend: every tensor the step creates is
recorded (JAX: the step's jaxpr; TensorFlow: its graph; torch: a dispatch
probe on the eager step) and the largest is compared with `B · T · V`."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_mtp

# B·T·V = 32768 elements; a chunk's logits are 8·V = 8192, the embedding
# table V·d = 16384.
B, T, V, D, CHUNK = 2, 16, 1024, 2, 8


def make_model(chunk):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=V,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
    )
    model = keras_mtp.MTPCausalLM(
        backbone, mtp_num_layers=D, loss_chunk_size=chunk
    )
    model.compile(optimizer="adam")
    model.optimizer.build(model.trainable_variables)
    return model


def batch():
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, V, (B, T)).astype("int32"),
        "padding_mask": np.ones((B, T), "int32"),
    }
    return x, rng.integers(0, V, (B, T)).astype("int32"), np.ones((B, T))


def largest_jax(model, step):
    import jax

    state = [
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
    ]
    if step == "train":
        state.append([v.value for v in model.optimizer.variables])
    state.append([v.value for v in model.metrics_variables])
    fn = model.train_step if step == "train" else model.test_step
    jaxpr = jax.make_jaxpr(fn)(tuple(state), batch())
    return max_size_in_jaxpr(jaxpr.jaxpr)


def max_size_in_jaxpr(jaxpr):
    import jax.extend

    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(var.aval.shape, dtype=int)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    largest = max(largest, max_size_in_jaxpr(sub))
    return largest


def largest_tensorflow(model, step):
    import tensorflow as tf

    fn = model.train_step if step == "train" else model.test_step
    graph = tf.function(fn).get_concrete_function(batch()).graph
    return max_size_in_graph(graph)


def max_size_in_graph(graph):
    largest = 0
    for op in graph.get_operations():
        for tensor in op.outputs:
            dims = tensor.shape.as_list() if tensor.shape.rank else []
            if None not in dims:
                largest = max(largest, int(np.prod(dims, dtype=int)))
    for function in graph._functions.values():  # loop bodies, remat
        largest = max(largest, max_size_in_graph(function.graph))
    return largest


def largest_torch(model, step):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Probe(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Probe.largest = max(Probe.largest, t.numel())
            return out

    fn = model.train_step if step == "train" else model.test_step
    with Probe():
        fn(batch())
    return Probe.largest


LARGEST = {
    "jax": largest_jax,
    "tensorflow": largest_tensorflow,
    "torch": largest_torch,
}


@pytest.mark.parametrize("step", ["train", "test"])
def test_chunked_step_makes_no_full_logits_tensor(step):
    backend = keras.config.backend()
    if backend not in LARGEST:
        pytest.skip(f"no tensor probe for backend {backend}")
    largest = LARGEST[backend]
    # The probe sees the full logits of a dense step...
    assert largest(make_model(None), step) >= B * T * V
    # ...and nothing that large in a chunked one.
    assert largest(make_model(CHUNK), step) < B * T * V
