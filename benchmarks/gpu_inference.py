"""GPU inference throughput of the Attention U-Net on Keras 3 + JAX: sizes, batches, dtypes."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import Table, command_line, machine_info, run_main, say, write_results

DEFAULT_SIZES = "256,512,1024"
DEFAULT_BATCHES = "1,8,32,64"
DEFAULT_POLICIES = "float32,mixed_bfloat16"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled JAX function, from XLA's cost analysis (None if absent)."""
    try:
        cost = compiled.cost_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    value = cost.get("flops") if isinstance(cost, dict) else None
    return float(value) if value else None


def measure_jit(model: Any, batch: int, size: int, seconds: float) -> dict[str, float | None]:
    """Images/s of a jitted ``stateless_call`` on device-resident input (JAX backend only)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch, size, size, model.input_shape[-1]),
                                           dtype=np.float32))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def forward(tv: Any, ntv: Any, inputs: Any) -> Any:
        out, _ = model.stateless_call(tv, ntv, inputs, training=False)
        return out

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(trainable, non_trainable, x).compile()
    compiled(trainable, non_trainable, x).block_until_ready()
    compile_s = time.perf_counter() - start
    iterations = 0
    start = time.perf_counter()
    while True:
        compiled(trainable, non_trainable, x).block_until_ready()
        iterations += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and iterations >= 3:
            break
    flops = _flops(compiled)
    return {
        "images/s": batch * iterations / elapsed,
        "ms/batch": 1000 * elapsed / iterations,
        "compile s": compile_s,
        "GFLOP/image": None if flops is None else flops / batch / 1e9,
    }


def measure_predict(model: Any, batch: int, size: int, seconds: float) -> dict[str, float | None]:
    """Images/s of ``model.predict_on_batch`` on host (numpy) input, as the node calls it."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, model.input_shape[-1]), dtype=np.float32)
    start = time.perf_counter()
    keras.ops.convert_to_numpy(model.predict_on_batch(x))
    compile_s = time.perf_counter() - start
    iterations = 0
    start = time.perf_counter()
    while True:
        keras.ops.convert_to_numpy(model.predict_on_batch(x))
        iterations += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and iterations >= 3:
            break
    return {
        "images/s": batch * iterations / elapsed,
        "ms/batch": 1000 * elapsed / iterations,
        "compile s": compile_s,
        "GFLOP/image": None,
    }


def build(size: int, base_filters: int, depth: int, channels: int) -> Any:
    """The paper's Attention U-Net (pneumonode.nets) at ``size`` px with random weights."""
    from pneumonode.nets.attention_unet import build_attention_unet

    return build_attention_unet(input_shape=(size, size, channels), base_filters=base_filters,
                                depth=depth)


def main(argv: list[str] | None = None) -> int:
    """Run the GPU benchmark; print the table and write ``results/gpu_inference.md``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"default {DEFAULT_SIZES}")
    parser.add_argument("--batches", default=DEFAULT_BATCHES, help=f"default {DEFAULT_BATCHES}")
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help=f"default {DEFAULT_POLICIES}")
    parser.add_argument("--modes", default="jit",
                        help="jit (stateless_call on device-resident input) and/or "
                             "predict_on_batch (host input, as the node); default jit")
    parser.add_argument("--seconds", type=float, default=1.5, help="timed seconds per config")
    parser.add_argument("--base-filters", type=int, default=16, help="paper: 16")
    parser.add_argument("--depth", type=int, default=5, help="paper: 5")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--copy-to", type=Path, help="also write the result file here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and model, runs on CPU in seconds; writes no result")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.batches, args.seconds = "32", "1,2", 0.1
        args.base_filters, args.depth = 2, 3
    if "KERAS_BACKEND" not in os.environ:
        if importlib.util.find_spec("jax") is None:
            say("jax is not installed: using Keras' default backend (predict_on_batch only)")
        else:
            os.environ["KERAS_BACKEND"] = "jax"
    info = machine_info()

    import keras

    backend = keras.backend.backend()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if backend != "jax" and "jit" in modes:
        say(f"backend {backend}: the jit mode needs JAX, measuring predict_on_batch only")
        modes = [m for m in modes if m != "jit"] or ["predict_on_batch"]
    device = "unknown"
    if backend == "jax":
        import jax

        first = jax.devices()[0]
        device = f"{first.platform}: {getattr(first, 'device_kind', first)}"
        device += f" x{len(jax.devices())}"
        info["JAX"] = jax.__version__
    info["Keras backend"] = f"{backend} (keras {keras.__version__})"
    info["device"] = device
    say(f"gpu_inference: {device}, sizes {args.sizes}, batches {args.batches}, "
        f"policies {args.policies}, modes {modes}")

    table = Table(
        f"Attention U-Net (base filters {args.base_filters}, depth {args.depth}) inference on "
        f"{device}",
        ["policy", "size", "batch", "mode", "images/s", "ms/batch", "GFLOP/image", "TFLOP/s",
         "compile s"],
    )
    measure = {"jit": measure_jit, "predict_on_batch": measure_predict}
    for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
        keras.mixed_precision.set_global_policy(policy)
        for size in _ints(args.sizes):
            model = build(size, args.base_filters, args.depth, args.channels)
            for batch in _ints(args.batches):
                for mode in modes:
                    try:
                        r = measure[mode](model, batch, size, args.seconds)
                    except Exception as exc:  # noqa: BLE001 - out of memory etc. becomes a row
                        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
                        table.add(policy, size, batch, mode, f"failed: {reason}", "", "", "", "")
                        say(f"  {policy} {size} px batch {batch} {mode}: failed: {reason}")
                        continue
                    gflop = r["GFLOP/image"]
                    rate = float(r["images/s"] or 0.0)
                    tflops = float("nan") if gflop is None else gflop * rate / 1000
                    table.add(policy, size, batch, mode, rate, r["ms/batch"],
                              float("nan") if gflop is None else gflop, tflops, r["compile s"])
                    say(f"  {policy} {size} px batch {batch} {mode}: {rate:.1f} images/s")
            del model
            keras.backend.clear_session()
            gc.collect()
    keras.mixed_precision.set_global_policy("float32")
    table.note = (
        "Random weights (throughput does not depend on them). jit: `jax.jit` of "
        "`model.stateless_call` on an input already on the device, compiled once, each call "
        "waited for (`block_until_ready`). predict_on_batch: numpy input copied to the device "
        "each call, as the node's predictor does. GFLOP/image from XLA's cost analysis."
    )
    say()
    say(table.markdown())
    if args.smoke:
        say("\nsmoke run: results not written")
        return 0
    path = write_results("gpu_inference", "GPU inference", command_line(), info,
                         [table.markdown()])
    if args.copy_to is not None:
        args.copy_to.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    say(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
