"""End-to-end latency: end of a C-STORE into pneumonode until its SEG lands at a storescp."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    PEER_ENV,
    REPO,
    SIIM_DICOM,
    STORESCU_PROPOSE,
    BenchmarkError,
    NodeProcess,
    StoreSCP,
    Table,
    command_line,
    copy_with_new_uids,
    free_port,
    machine_info,
    median,
    percentile,
    run_main,
    running,
    say,
    storescu_command,
    transfer_syntax,
    wait_for,
    write_node_config,
    write_results,
)
from _profile import (
    Recorder,
    Sample,
    categories_table,
    top_functions_table,
    top_lines_table,
    total,
)

TARGET_MEDIAN_S = 1.0


@dataclass(frozen=True)
class Source:
    """A set of input files (one per image to send) and how storescu must propose them."""

    name: str
    files: tuple[Path, ...]
    copies: int

    def fresh_copies(self, folder: Path, tag: str) -> list[Path]:
        """New copies (new SOP Instance UIDs) of the files, ``copies`` in all, round robin."""
        paths: list[Path] = []
        for i in range(self.copies):
            source = self.files[i % len(self.files)]
            paths += copy_with_new_uids(source, folder, 1, f"{tag}-{i:03d}")
        return paths


@dataclass(frozen=True)
class Sent:
    """One image sent in a scenario."""

    scenario: str
    source: str
    path: Path
    sop_instance_uid: str


def find_sources(siim_count: int, rg1_count: int) -> tuple[list[Source], list[str]]:
    """The SIIM sample images and pydicom-data's RG1_J2KR.dcm, with messages for those absent."""
    sources: list[Source] = []
    missing: list[str] = []
    siim = sorted(SIIM_DICOM.glob("*.dcm")) if SIIM_DICOM.is_dir() else []
    if siim:
        sources.append(Source("SIIM 1024x1024 (JPEG Baseline SC)", tuple(siim), siim_count))
    else:
        missing.append(f"SIIM sample images skipped: {SIIM_DICOM.resolve()} is absent")
    try:
        import pydicom.data

        rg1 = Path(pydicom.data.get_testdata_file("RG1_J2KR.dcm") or "")
    except (ImportError, ValueError, OSError) as exc:
        rg1 = Path()
        missing.append(f"RG1_J2KR.dcm skipped: pydicom-data unavailable ({exc})")
    if rg1.is_file():
        sources.append(Source("RG1 1955x1841 CR (JPEG 2000 lossless)", (rg1,), rg1_count))
    elif not any("RG1" in m for m in missing):
        missing.append("RG1_J2KR.dcm skipped: not found in pydicom-data (pip install pydicom-data)")
    return sources, missing


def _storescu(files: Sequence[Path], port: int) -> subprocess.Popen[str]:
    propose = STORESCU_PROPOSE.get(transfer_syntax(files[0]))
    return subprocess.Popen(
        storescu_command(files, port, "PNEUMONODE", aet="MODALITY", propose=propose),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=PEER_ENV,
    )


def _finish(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise BenchmarkError(f"storescu failed ({proc.returncode}): {out[-1000:]}")


def run_scenario(
    node: NodeProcess,
    dest: StoreSCP,
    files: list[Path],
    senders: int,
    spaced: bool,
    gap_s: float,
    timeout_s: float,
) -> None:
    """Send ``files`` from ``senders`` concurrent storescu processes and wait for the results.

    Spaced: each sender sends one image per wave, and the next wave starts only once every
    result of the wave has arrived and ``gap_s`` passed (each image meets an idle node).
    Burst: each sender sends its share at once over one association.
    """
    groups = [files[i::senders] for i in range(senders)]
    expected = len(dest.files())

    def arrived(n: int) -> Callable[[], bool]:
        return lambda: len(dest.files()) >= n

    if spaced:
        for wave in itertools.zip_longest(*groups):
            batch = [f for f in wave if f is not None]
            _finish([_storescu([f], node.port) for f in batch])
            expected += 2 * len(batch)
            try:
                wait_for(arrived(expected), timeout_s, "the SEG and overlay of a wave")
            except BenchmarkError as exc:
                raise BenchmarkError(f"{exc}; node log:\n{node.tail()}") from exc
            time.sleep(gap_s)
    else:
        _finish([_storescu(group, node.port) for group in groups if group])
        expected += 2 * len(files)
        try:
            wait_for(arrived(expected), timeout_s * len(files), "the burst's results")
        except BenchmarkError as exc:
            raise BenchmarkError(f"{exc}; node log:\n{node.tail()}") from exc
        time.sleep(gap_s)


def sop_uid(path: Path) -> str:
    """SOP Instance UID of a file."""
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def latencies(
    sent: list[Sent], jobs: list[dict[str, Any]], dest: StoreSCP
) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Seconds from each job's received_at to its SEG's (and overlay's) mtime at storescp."""
    by_uid = {str(j["sop_instance_uid"]): j for j in jobs}
    arrived: dict[str, float] = {}
    for path in dest.files():
        uid = path.name.split(".", 1)[1] if "." in path.name else path.name
        arrived[uid] = path.stat().st_mtime
    result: dict[tuple[str, str], dict[str, list[float]]] = {}
    for item in sent:
        job = by_uid.get(item.sop_instance_uid)
        if job is None:
            raise BenchmarkError(f"no job for {item.sop_instance_uid}")
        received = dt.datetime.fromisoformat(str(job["received_at"]))
        if received.tzinfo is None:
            received = received.replace(tzinfo=dt.UTC)
        start = received.timestamp()
        seg, sc = arrived.get(str(job["seg_sop_uid"])), arrived.get(str(job["sc_sop_uid"]))
        if seg is None or sc is None:
            raise BenchmarkError(f"job {job['id']} ({job['state']}): results not at storescp")
        entry = result.setdefault((item.source, item.scenario), {"seg": [], "sc": []})
        entry["seg"].append(seg - start)
        entry["sc"].append(sc - start)
    return result


def node_rules() -> list[tuple[str, Callable[[Sample], bool]]]:
    """Where the node's worker, inference and sender threads spend busy time."""
    return [
        ("read spool file (dcmread)", lambda s: s.has("_prepare") and s.has("dcmread")),
        ("decode pixels (pixels.decode: codec, LUTs)", lambda s: s.has("pneumonode/dicom/pixels")),
        ("inference: prepare (resize, normalise)", lambda s: s.has("Predictor.prepare")),
        ("inference: model (predict_on_batch, TTA)", lambda s: s.has("Predictor._run")),
        ("inference: post-process (threshold, mask to source size)",
         lambda s: s.has("Predictor.analyse")),
        ("SEG build (highdicom)", lambda s: s.has("build_segmentation")),
        ("SC overlay build", lambda s: s.has("build_overlay")),
        ("write results (save, fsync, rename)",
         lambda s: s.has("_write_results") or s.has("_write_durably")),
        ("send SEG + SC (scu.store)", lambda s: s.has("pneumonode/dicom/scu")),
        ("job database updates", lambda s: s.has("pneumonode/queue")),
        ("other worker/sender code", lambda s: True),
    ]


_WAITS = ("Condition.wait", "Event.wait", "Queue.get", "select", "sleep")


def is_waiting(sample: Sample) -> bool:
    """Whether the stack is a thread waiting (lock, event, queue, sleep, select)."""
    if not sample.frames:
        return True
    leaf = sample.frames[-1]
    return any(w in leaf.func for w in _WAITS) or leaf.source().startswith(
        ("time.sleep", "gotit = waiter.acquire", "waiter.acquire()", "signaled = self._cond")
    )


def profile_tables(samples: list[Sample], name: str, images: int, rate: int) -> list[Table]:
    """Busy samples of the node's worker, inference and sender threads, by step."""
    pipeline = [s for s in samples
                if (s.has("Worker.run") or s.has("run_with_time_limit") or s.has("Sender.run"))
                and not is_waiting(s)]
    table = categories_table(pipeline, node_rules(),
                             f"Profile, {name}: the node's worker, inference and sender threads "
                             "(busy samples)", rate, images, "image")
    table.note = (f"{total(pipeline)} busy samples at {rate} Hz for {images} images sent one at a "
                  "time to an idle node (py-spy --idle, waits removed). TensorFlow's own threads "
                  "are not Python threads: the model's time is the Python thread's time in "
                  "predict_on_batch.")
    database = top_functions_table(
        [s for s in pipeline if s.has("pneumonode/queue")],
        f"Profile, {name}: job database time by repository call (same samples)", rate,
        include=lambda f: "pneumonode/queue/repository" in f.file and "._" not in f.func,
        limit=8,
    )
    return [table,
            top_lines_table(pipeline, f"Profile, {name}: top lines by self time (same samples)",
                            rate, limit=10),
            database]


def step_timings(sources: list[Source], model: Path | None, dest_port: int,
                 folder: Path) -> Table:
    """The worker's steps timed one by one in this process, on one copy of each file."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from pneumonode.dicom.pixels import decode
    from pneumonode.dicom.scu import Remote, store
    from pneumonode.inference.predictor import Predictor
    from pneumonode.outputs.overlay import build_overlay
    from pneumonode.outputs.seg import build_segmentation
    from pneumonode.settings import Settings

    settings = Settings()
    predictor = Predictor.load(model if model is not None else settings.model_path)
    steps = ["read", "decode", "prepare", "model (TTA)", "analyse total", "SEG build", "SC build",
             "write + fsync", "send"]
    table = Table("In-process step timings, ms (median per source; one image at a time)",
                  ["source", "images", *steps, "sum"])
    for source in sources:
        times: dict[str, list[float]] = {k: [] for k in steps}
        files = list(source.files)[: max(1, min(len(source.files), source.copies))]
        files = (files * 3)[: max(3, len(files))]
        for i, path in enumerate(files):
            t0 = time.perf_counter()
            ds = dcmread(path)
            t1 = time.perf_counter()
            image = decode(ds, max_pixels=settings.worker.max_pixels)
            t2 = time.perf_counter()
            batch = predictor.prepare(image.image)[None]
            t3 = time.perf_counter()
            predictor.probabilities(batch)
            t4 = time.perf_counter()
            (finding,) = predictor.analyse([image.image], [image.pixel_spacing_mm])
            t5 = time.perf_counter()
            seg = build_segmentation(ds, finding, predictor.card,
                                     series_instance_uid=generate_uid(),
                                     sop_instance_uid=generate_uid())
            t6 = time.perf_counter()
            overlay = build_overlay(ds, image, finding, predictor.card,
                                    series_instance_uid=generate_uid(),
                                    sop_instance_uid=generate_uid())
            t7 = time.perf_counter()
            paths = [folder / f"seg{i}.dcm", folder / f"sc{i}.dcm"]
            for out, obj in zip(paths, (seg, overlay), strict=True):
                obj.save_as(out, enforce_file_format=True)
                fd = os.open(out, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            t8 = time.perf_counter()
            store(paths, "PNEUMONODE", Remote("STORESCP", "127.0.0.1", dest_port))
            t9 = time.perf_counter()
            if i == 0:
                continue  # the first call pays for tracing and codec set-up
            for key, value in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5,
                                          t7 - t6, t8 - t7, t9 - t8), strict=True):
                times[key].append(1000 * value)
        medians = [median(times[k]) for k in steps]
        total_ms = sum(m for k, m in zip(steps, medians, strict=True)
                       if k not in ("prepare", "model (TTA)"))
        table.add(source.name, len(times["read"]), *medians, total_ms)
    table.note = ("`analyse total` includes prepare and model (timed separately on the same image "
                  "before it); `sum` = read + decode + analyse total + SEG + SC + write + send. "
                  "The first image of each source is a warm-up and not counted.")
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the latency benchmark; print the tables and write ``results/latency.md``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model package (default: the bundled demo)")
    parser.add_argument("--siim-count", type=int, default=10,
                        help="SIIM images per scenario (default 10: each sample once)")
    parser.add_argument("--rg1-count", type=int, default=6,
                        help="copies of RG1_J2KR.dcm per scenario (default 6)")
    parser.add_argument("--gap", type=float, default=0.5,
                        help="idle seconds between spaced waves (default 0.5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per image")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    parser.add_argument("--profile-count", type=int, default=4,
                        help="images per source in the py-spy pass (default 4)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy pass")
    parser.add_argument("--no-steps", action="store_true", help="skip in-process step timings")
    args = parser.parse_args(argv)
    if args.model is not None and not (args.model / "model_card.json").is_file():
        parser.error(f"--model {args.model} is not a model package folder (no model_card.json)")
    info = machine_info()
    sources, missing = find_sources(args.siim_count, args.rg1_count)
    for message in missing:
        say(message)
    if not sources:
        say("nothing to measure")
        return 0
    say(f"latency: {', '.join(s.name for s in sources)}; load "
        f"{info['load average at start (1, 5, 15 min)']}")
    scenarios = [(1, True), (4, True), (1, False), (4, False)]
    sent: list[Sent] = []
    with tempfile.TemporaryDirectory(prefix="pneumonode-bench-latency-") as tmp:
        root = Path(tmp)
        dest = StoreSCP(root / "dest", free_port())
        config = write_node_config(
            root / "node.toml", port=free_port(), data_dir=root / "data",
            destinations=[(dest.ae_title, "127.0.0.1", dest.port)], model=args.model,
        )
        node = NodeProcess(config, root / "node.log")
        with running(dest, node):
            warm = sources[0].fresh_copies(root / "warm", "warm")[:1]
            run_scenario(node, dest, warm, 1, True, args.gap, args.timeout * 3)
            for source, (senders, spaced) in itertools.product(sources, scenarios):
                name = f"{senders} sender{'s' if senders > 1 else ''}, " + (
                    "spaced (idle node at each wave)" if spaced else "burst")
                tag = f"s{len(sent):04d}"
                files = source.fresh_copies(root / "send" / tag, tag)
                start = time.perf_counter()
                run_scenario(node, dest, files, senders, spaced, args.gap, args.timeout)
                say(f"  {source.name}: {name}: {len(files)} images in "
                    f"{time.perf_counter() - start:.1f} s")
                sent += [Sent(name, source.name, f, sop_uid(f)) for f in files]
            profiled: list[Table] = []
            if not args.no_profile:
                for source in sources:
                    few = dataclasses.replace(source, copies=args.profile_count)
                    files = few.fresh_copies(root / "profile" / f"p{len(profiled)}", "p")
                    out = root / f"profile{len(profiled)}.txt"
                    recorder = Recorder(node.pid, out, rate=args.profile_rate).start()
                    try:
                        run_scenario(node, dest, files, 1, True, args.gap, args.timeout)
                    finally:
                        samples = recorder.stop()
                    profiled += profile_tables(samples, source.name, len(files),
                                               args.profile_rate)
                    say(f"  profiled {len(files)} spaced images of {source.name}")
            results = latencies(sent, node.jobs(), dest)
        steps = None
        if not args.no_steps:
            step_dest = StoreSCP(root / "step-dest", free_port())
            with running(step_dest):
                steps = step_timings(sources, args.model, step_dest.port, root)

    table = Table(
        "Latency: end of C-STORE (job received_at) to arrival at storescp (file mtime), seconds",
        ["source", "scenario", "images", "SEG median", "SEG p95", "SEG max", "SC median",
         "SC p95", f"median < {TARGET_MEDIAN_S:g} s"],
    )
    for (source_name, scenario), values in results.items():
        seg, sc = values["seg"], values["sc"]
        table.add(source_name, scenario, len(seg), median(seg), percentile(seg, 95), max(seg),
                  median(sc), percentile(sc, 95),
                  "yes" if median(seg) < TARGET_MEDIAN_S else "NO")
    model_name = str(args.model or "bundled demo (pneumonode/models/demo)")
    model_dir = args.model or REPO / "pneumonode" / "models" / "demo"
    with contextlib.suppress(OSError, ValueError, KeyError):
        card = json.loads((model_dir / "model_card.json").read_text(encoding="utf-8"))
        model_name += (f", input {card['input']['size']} px, TTA hflip {card['tta']['hflip']}, "
                       f"{len(card['members'])} member(s)")
    table.note = (
        f"Model: {model_name}; node defaults (1 worker, batch up to 4 with 20 ms wait, 1 sender); "
        "CPU (TensorFlow). Each image is a fresh copy (new SOP Instance UID). Spaced: each "
        f"sender sends one image per wave, the next wave {args.gap:g} s after the last result "
        "arrived. Burst: each sender sends all its images over one association at once; "
        "4 senders = 4 concurrent storescu processes. The SEG is sent first, the overlay "
        "(SC) right after on the same association."
    )
    sections = [table.markdown(), *missing]
    if steps is not None:
        sections.append(steps.markdown())
    sections += [t.markdown() for t in profiled]
    for block in sections:
        say()
        say(block)
    path = write_results("latency", "End-to-end latency", command_line(), info, sections)
    say(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
