"""GPU pipeline: the node end to end on Keras 3 + JAX beside bare predict_on_batch of its model.

The pipeline of ``pipeline.py`` (N images over one association into ``pneumonode serve``, timed
until the last result arrives at its destination) with ``KERAS_BACKEND=jax``, and, on the same
device in the same run, the bundled model's ``predict_on_batch`` alone (with the card's TTA, as
the predictor calls it) on ready tensors: how much of the device the node keeps busy. Uses DCMTK
``storescu``/``storescp`` where installed, else a pynetdicom sender and receiver (GPU machines
without DCMTK). ``--smoke`` runs on CPU in well under a minute with synthetic images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    SIIM_DICOM,
    BenchmarkError,
    Table,
    command_line,
    machine_info,
    median,
    run_main,
    say,
    warm_page_cache,
    write_results,
)
from pipeline import (
    Config,
    Measured,
    make_inputs,
    measure_pipeline,
    pipeline_configs,
    processes_support,
    send_dcmtk,
    send_pynetdicom,
)

DEMO_MODEL = REPO / "pneumonode" / "models" / "demo"


def choose_backend(smoke: bool) -> str:
    """KERAS_BACKEND for this process and the node, unless set: jax where installed.

    A smoke run prefers TensorFlow where it is installed: on a CPU, loading the model package
    under JAX compiles every eager op of the layers' construction (over a minute on 2 busy
    cores) and JAX's CPU convolutions are about 10x slower than TensorFlow's. Also keeps JAX
    from taking most of the device's memory in the first process that touches it (the node,
    its worker processes and this script share one device).
    """
    if "KERAS_BACKEND" not in os.environ:
        tensorflow = importlib.util.find_spec("tensorflow") is not None
        if importlib.util.find_spec("jax") is not None and not (smoke and tensorflow):
            os.environ["KERAS_BACKEND"] = "jax"
        elif smoke and tensorflow:
            say("smoke run: TensorFlow backend (set KERAS_BACKEND=jax to check JAX, slowly)")
        else:
            say("jax is not installed: Keras' default backend is used")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return os.environ.get("KERAS_BACKEND", "tensorflow (Keras' default)")


def node_batch_size() -> tuple[int, str]:
    """The node's ``worker.batch_size`` default (4 with a note when the settings cannot load)."""
    try:
        from pneumonode.settings import Settings

        return int(Settings().worker.batch_size), ""
    except Exception as exc:  # noqa: BLE001 - a missing dependency is reported, not fatal
        return 4, f"node settings not loadable here ({type(exc).__name__}: {exc}); batch 4 assumed"


def load_members(model: Path) -> tuple[list[Any], dict[str, Any]]:
    """The package's Keras models and its card (as JSON)."""
    card = json.loads((model / "model_card.json").read_text(encoding="utf-8"))
    try:
        from pneumonode.inference.package import load_package

        return list(load_package(model).members), card
    except ImportError:
        import keras

        import pneumonode.nets  # noqa: F401 - registers the attention gate

        return [keras.saving.load_model(model / m, compile=False) for m in card["members"]], card


def measure_bare(model: Path, batch: int, seconds: float) -> dict[str, float]:
    """Images/s of the package's models alone: predict_on_batch with the card's TTA, host input.

    One call per member on ``batch`` images (2 x ``batch`` inputs with horizontal-flip TTA), as
    :meth:`pneumonode.inference.predictor.Predictor.probabilities` makes them, output copied
    back to the host; no resizing, normalising or post-processing.
    """
    import keras
    import numpy as np

    members, card = load_members(model)
    size, channels = int(card["input"]["size"]), int(card["input"]["channels"])
    hflip = bool(card.get("tta", {}).get("hflip", False))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, channels), dtype=np.float32)
    x = np.concatenate([x, x[:, :, ::-1, :]]) if hflip else x

    def call() -> None:
        for member in members:
            keras.ops.convert_to_numpy(member.predict_on_batch(x))

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    calls = 0
    start = time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            break
    return {"images/s": batch * calls / elapsed, "ms/call": 1000 * elapsed / calls,
            "first call s": first, "inputs": float(x.shape[0] * len(members)),
            "size": float(size)}


def device_name() -> tuple[str, dict[str, str]]:
    """The device Keras computes on, and version facts for the machine list."""
    import keras

    facts = {"Keras backend": f"{keras.backend.backend()} (keras {keras.__version__})"}
    if keras.backend.backend() == "jax":
        import jax

        first = jax.devices()[0]
        facts["JAX"] = jax.__version__
        return f"{first.platform}: {getattr(first, 'device_kind', first)}", facts
    return "cpu", facts


def main(argv: list[str] | None = None) -> int:
    """Run the GPU pipeline benchmark; print the tables and write ``results/gpu_pipeline.md``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200, help="images per run (default 200)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
    parser.add_argument("--processes", default="",
                        help="worker.processes values to measure besides the node's default, "
                             "comma-separated (e.g. 1,4,8; default none)")
    parser.add_argument("--images", type=Path,
                        help="send copies of these DICOM files (default: the SIIM samples in "
                             "../shared/data, else synthetic 1024 px DX)")
    parser.add_argument("--synthetic", type=int, metavar="SIZE", help="synthetic DX of SIZE px")
    parser.add_argument("--warmup", type=int, default=16,
                        help="warm-up images per node, compiling its batch shapes (default 16)")
    parser.add_argument("--batches", default="",
                        help="bare batch sizes (default: the node's worker.batch_size and 32)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per bare batch")
    parser.add_argument("--peers", choices=("auto", "dcmtk", "python"), default="auto",
                        help="sender and destination: DCMTK, pynetdicom, or DCMTK where installed")
    parser.add_argument("--model", type=Path, help="model package (default: the bundled demo)")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="seconds to wait for a run's results (default max(180, 2 x count))")
    parser.add_argument("--copy-to", type=Path, help="also write the result file here")
    parser.add_argument("--smoke", action="store_true",
                        help="4 synthetic 256 px images, no warm-up, pynetdicom peers, node and "
                             "bare model at once: checks the script on CPU in well under a "
                             "minute; writes no result")
    args = parser.parse_args(argv)
    if args.smoke:
        args.count, args.rounds, args.warmup, args.seconds = 4, 1, 0, 0.3
        args.synthetic, args.images, args.processes = args.synthetic or 256, None, ""
        args.peers = "python" if args.peers == "auto" else args.peers
    try:
        processes = [int(x) for x in args.processes.split(",") if x.strip()]
        batches = [int(x) for x in args.batches.split(",") if x.strip()]
    except ValueError:
        parser.error("--processes and --batches take comma-separated integers")
    model = args.model or DEMO_MODEL
    backend = choose_backend(args.smoke)
    dcmtk = shutil.which("storescu") is not None and shutil.which("storescp") is not None
    if args.peers == "dcmtk" and not dcmtk:
        raise BenchmarkError("--peers dcmtk: storescu/storescp not installed (Debian dcmtk)")
    python_peers = args.peers == "python" or (args.peers == "auto" and not dcmtk)
    send = send_pynetdicom if python_peers else send_dcmtk
    peers = ("pynetdicom sender, pynetdicom receiver (benchmarks/_common.py sink)"
             if python_peers else "DCMTK storescu (TCP_NODELAY=1), DCMTK storescp")
    synthetic = args.synthetic
    if args.images is None and not synthetic:
        if not (SIIM_DICOM.is_dir() and any(SIIM_DICOM.glob("*.dcm"))):
            say(f"{SIIM_DICOM} absent: synthetic 1024 px DX images instead")
            synthetic = 1024
    info = machine_info()
    batch_default, batch_note = node_batch_size()
    if batch_note:
        say(batch_note)
    batches = batches or ([batch_default] if args.smoke else sorted({batch_default, 32}))
    timeout = args.timeout or max(180.0, 2.0 * args.count)
    say(f"gpu_pipeline: backend {backend}, {args.count} images, peers: {peers}; load "
        f"{info['load average at start (1, 5, 15 min)']}")

    state: dict[str, Any] = {"failure": "", "runs": {}, "configs": [], "scaling": ""}

    def node_rounds(root: Path) -> None:
        nonlocal processes
        default_processes = None
        if processes:
            ok, why, default_processes = processes_support(root / "check")
            if not ok:
                state["scaling"] = f"worker.processes not available ({why}): defaults only"
                say(state["scaling"])
                processes = []
        configs = pipeline_configs(processes, default_processes, orthanc=False, ingest=False)
        state["configs"] = configs
        files, warmup, what = make_inputs(root / "images", args.count, args.warmup, args.images,
                                          synthetic)
        state["what"] = what
        warm_page_cache(files + warmup)
        runs: dict[str, list[Measured]] = {c.key: [] for c in configs}
        state["runs"] = runs
        for round_no in range(args.rounds):
            for config in configs:
                folder = root / f"round{round_no}" / config.key.replace("=", "")
                try:
                    m = measure_pipeline(folder, config, files, warmup, send=send,
                                         python_peers=python_peers, timeout=timeout,
                                         model=args.model)
                except BenchmarkError as exc:
                    state["failure"] = f"{config.label}: {exc}"
                    say(f"  the node could not run the pipeline here: {state['failure'][-3000:]}")
                    return
                runs[config.key].append(m)
                say(f"  round {round_no + 1} {config.label}: last result after "
                    f"{m.pipeline_s:.2f} s ({args.count / (m.pipeline_s or 1):.2f} images/s), "
                    f"sender {m.storescu_s:.2f} s")

    def guarded(root: Path) -> None:
        try:
            node_rounds(root)
        except Exception as exc:  # noqa: BLE001 - reported beside the bare figures
            state["failure"] = f"{type(exc).__name__}: {exc}"
            say(f"  the node pipeline failed: {state['failure'][-3000:]}")
        if not state["failure"] and not any(state["runs"].values()):
            state["failure"] = "no pipeline run completed"

    def bare() -> list[tuple[int, dict[str, float]]]:
        rows = []
        for batch in batches:
            r = measure_bare(model, batch, args.seconds)
            rows.append((batch, r))
            say(f"  bare predict_on_batch, batch {batch}: {r['images/s']:.1f} images/s")
        return rows

    with tempfile.TemporaryDirectory(prefix="pneumonode-bench-gpu-pipeline-") as tmp:
        if args.smoke:
            # Only a check of the script: the node and the bare model run at the same time.
            thread = threading.Thread(target=guarded, args=(Path(tmp),), daemon=True)
            thread.start()
            bare_rows = bare()
            thread.join()
        else:
            guarded(Path(tmp))
            bare_rows = bare()
    node_failure: str = state["failure"]
    runs: dict[str, list[Measured]] = state["runs"]
    configs: list[Config] = state["configs"]
    scaling_note: str = state["scaling"]
    what = state.get("what", "images")
    device, facts = device_name()
    info.update(facts)
    info["device"] = device

    table = Table(f"Node pipeline vs bare model on {device} ({backend})",
                  ["what", "batch (images)", "images/s", "median s", "runs (s)"])
    node_rate = float("nan")
    node_rates: dict[str, float] = {}
    for config in configs:
        whole = [m.pipeline_s or float("nan") for m in runs.get(config.key, [])]
        if whole:
            rate = args.count / median(whole)
            node_rates[config.label] = rate
            if config.processes is None or "(the default)" in config.label:
                node_rate = rate
            table.add(f"{config.label}: first byte sent -> last result arrived",
                      f"up to {batch_default}", rate, median(whole),
                      ", ".join(f"{t:.2f}" for t in whole))
    for batch, r in bare_rows:
        table.add(f"bare predict_on_batch ({int(r['inputs'])} inputs of "
                  f"{int(r['size'])} px per call)", batch, r["images/s"],
                  r["ms/call"] / 1000, f"first call {r['first call s']:.2f} s")
    bare_rate = bare_rows[0][1]["images/s"]
    ratio = Table("Ratios", ["ratio", "value"])
    for label, rate in node_rates.items() or {"pneumonode": float("nan")}.items():
        ratio.add(f"{label} / bare (batch {bare_rows[0][0]})", rate / bare_rate)
    table.note = (
        f"{args.count} x {what}, one association ({peers}); the node with its defaults"
        f"{'' if args.model is None else f' and model {args.model}'}, warmed up with "
        f"{args.warmup} other images (XLA compiles each batch shape once)"
        f"{'; smoke run: node and bare model measured at the same time' if args.smoke else ''}"
        ". Bare: the same "
        "model package's members on the same device, random host input of the model's size, "
        "horizontal-flip TTA copies included as the predictor makes them, output copied back; "
        "no decode, resize or post-processing."
    )
    sections = [table.markdown(), ratio.markdown()]
    if node_failure:
        sections.append(f"The node did not complete the pipeline here: {node_failure[:1500]}")
    if scaling_note:
        sections.append(scaling_note)
    say()
    for block in sections:
        say(block)
        say()
    if node_failure:
        say("node pipeline: not available (see above)")
    else:
        say(f"node pipeline: {node_rate:.3f} images/s")
    say(f"bare predict_on_batch: {bare_rate:.3f} images/s")
    if args.smoke:
        say("smoke run: results not written")
        return 1 if node_failure else 0
    path = write_results("gpu_pipeline", "GPU pipeline", command_line(), info, sections)
    if args.copy_to is not None:
        args.copy_to.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    say(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
