"""bench_decode.py's measurement on an accelerator (JAX, one GPU).

    KERAS_BACKEND=jax python benchmarks/bench_decode_device.py   # ~3 min, H200

Trains a trunk-dominated llama (d=1024, L=16, byte vocabulary, 3 MTP depths,
190M + 3 x 14M parameters) for STEPS=400 steps of 32 x 256 bytes of the
Python standard library's .py files, then runs `bench_decode.decode` (plain
keras-hub greedy vs `MTPCausalLM.generate(speculative=True)`, alternating
prompt by prompt, 8 held-out prompts of 32 bytes + 96 new, 3 rounds) for
D = 1, 2, 3 (env DEPTHS) and top-k sampling at D = 1. It needs no
TensorFlow (it makes its own byte-level data), so it runs where only JAX and
keras/keras-hub are installed. PRECISION=highest sets JAX's default matmul
precision for decoding (float32 matmuls instead of TF32 on NVIDIA GPUs).

Greedy outputs are compared with plain decoding and the number of prompts
that differ is reported instead of raised: on a GPU, a window of D + 1
tokens and a single token go through different matmul kernels, and with
TF32 rounding a near-tie argmax can flip (see README). `--small`: a tiny
model, a smoke run on CPU. Writes `$OUT/gpu_bench.json` (OUT=/tmp default).
"""

import glob
import json
import os
import sys
import time
import types

os.environ.setdefault("KERAS_BACKEND", "jax")
# bench_decode imports keras_mtp.data (tf.data); TensorFlow is not on the
# device and this script makes its own byte-level data.
sys.modules["keras_mtp.data"] = types.ModuleType("keras_mtp.data")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_mtp  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
small = "--small" in sys.argv
d, L, heads, ff = (32, 2, 2, 64) if small else (1024, 16, 16, 2816)
steps = 20 if small else int(os.environ.get("STEPS", 400))
B, T = (4, 64) if small else (32, 256)
report = {"backend": keras.config.backend(), "keras": keras.__version__}
if keras.config.backend() == "jax":
    import jax

    report["devices"] = [str(x) for x in jax.devices()]
else:
    import torch

    report["devices"] = [
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    ]


def save():
    with open(os.path.join(OUT, "gpu_bench.json"), "w") as f:
        json.dump(report, f, indent=1)


files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
raw = b"\n".join(open(f, "rb").read() for f in files)
ids = np.frombuffer(raw, np.uint8).astype("int32") + 1
cut = int(len(ids) * 0.95)
rng = np.random.default_rng(0)
starts = rng.integers(0, cut - T - 1, steps * B)
rows = ids[starts[:, None] + np.arange(T + 1)]
config = dict(hidden_dim=d, num_layers=L, num_heads=heads, intermediate_dim=ff)
model = bd.untrained_model(config, vocabulary_size=320, mtp_num_layers=3)
# The warmup comes before the `steps` of the decay, as the figures measured.
schedule = keras_mtp.callbacks.warmup_cosine(
    1e-3, steps + steps // 10, warmup_steps=steps // 10
)
model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01))
params = bd.parameter_counts(model)
report.update(config=config, params=params, train_steps=steps, batch=[B, T])
start = time.time()
history = model.fit(
    {
        "token_ids": rows[:, :-1],
        "padding_mask": np.ones((len(rows), T), "int32"),
    },
    rows[:, 1:],
    batch_size=B,
    epochs=1,
    verbose=2,
)
report["train_seconds"] = time.time() - start
report["train_logs"] = {k: float(v[-1]) for k, v in history.history.items()}
save()
vstarts = cut + np.arange(8) * 5003
prompts = ids[vstarts[:, None] + np.arange(32)].astype("int32")
mismatches = []


def record(actual, desired):  # greedy outputs: count differing prompts
    mismatches.append(int((np.asarray(actual) != np.asarray(desired)).any()))


np.testing.assert_array_equal = record
if os.environ.get("PRECISION"):
    jax.config.update("jax_default_matmul_precision", os.environ["PRECISION"])
report["decode_matmul_precision"] = os.environ.get("PRECISION", "default")
report["depths"] = []
for depth in [int(x) for x in os.environ.get("DEPTHS", "1 2 3").split()]:
    mismatches.clear()
    sub = bd.with_depths(model, depth)
    row = bd.decode(sub, prompts[:, None], 32 + 96, 3)
    row["depth"] = depth
    row["prompts_differing_from_plain"] = f"{sum(mismatches)}/{len(mismatches)}"
    row["modelled_accelerator_speedup"] = bd.modelled_accelerator_speedup(
        params, depth, row["tokens_per_forward"]
    )
    report["depths"].append(row)
    print(json.dumps(row), flush=True)
    save()
try:
    row = bd.decode(
        bd.with_depths(model, 1), prompts[:, None], 32 + 96, 3, sampler="top_k"
    )
    report["sampling_top_k_depth1"] = row
    print(json.dumps(row), flush=True)
except Exception as e:  # noqa: BLE001 - reported, not hidden
    report["sampling_error"] = repr(e)
save()
print("done", time.time() - start)
