"""Pipeline benchmark: N chest X-rays over one association until their results land, vs Orthanc.

N copies of the SIIM sample images (fresh SOP Instance UIDs) are sent by one DCMTK ``storescu``
association (TCP_NODELAY=1) into ``pneumonode serve`` (bundled model, defaults otherwise) whose
destination is a ``storescp``. Timed: from just before storescu starts (first byte) to the
arrival (file mtime) of the last result (SEG, SC and SR) at the storescp. Beside it, in the same
rounds with fresh receivers: Orthanc storing the same set (store-only), the node with its worker
off (ingest only), the node's storescu wall time while it also processes (ingest with the
worker running), and the node with 1 and 2 worker processes (``worker.processes``), when that
setting exists.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from _common import (
    PEER_ENV,
    REPO,
    SIIM_DICOM,
    STORESCU_PROPOSE,
    BenchmarkError,
    NodeProcess,
    Orthanc,
    SinkSCP,
    StoreSCP,
    Table,
    command_line,
    copy_with_new_uids,
    free_port,
    machine_info,
    median,
    run_main,
    running,
    say,
    storescu_command,
    transfer_syntax,
    wait_for,
    warm_page_cache,
    write_dx_set,
    write_node_config,
    write_results,
)

#: Environment variable of the worker-processes setting (0: workers as threads of the server).
PROCESSES_ENV = "PNEUMONODE_WORKER__PROCESSES"
#: Final job states (the rest are still on their way).
FINAL_STATES = ("done", "failed", "skipped")
TARGETS = {
    "pipeline / Orthanc store-only": 0.15,
    "ingest with the worker running / Orthanc": 1.0,
    "2 processes / 1 process (pipeline)": 1.6,
}


# --------------------------------------------------------------------------- inputs


def siim_copies(folder: Path, count: int, source_dir: Path = SIIM_DICOM) -> list[Path]:
    """``count`` copies of the DICOM files in ``source_dir``, round robin, each a new SOP UID."""
    sources = sorted(source_dir.glob("*.dcm")) if source_dir.is_dir() else []
    if not sources:
        raise BenchmarkError(
            f"no DICOM files in {source_dir.resolve()} (the SIIM samples are read from "
            "../shared/data beside the repository; pass --images DIR or --synthetic SIZE)"
        )
    paths: list[Path] = []
    for i in range(count):
        paths += copy_with_new_uids(sources[i % len(sources)], folder, 1, f"img{i:05d}")
    return paths


def make_inputs(
    folder: Path, count: int, warm: int, images: Path | None, synthetic: int | None
) -> tuple[list[Path], list[Path], str]:
    """The measured files, the warm-up files (other UIDs) and a description of them."""
    if synthetic:
        made = write_dx_set(folder, count + warm, synthetic)
        what = f"synthetic DX {synthetic}x{synthetic} (Explicit VR Little Endian)"
        return made[warm:], made[:warm], what
    source = images if images is not None else SIIM_DICOM
    files = siim_copies(folder / "send", count, source)
    warmup = siim_copies(folder / "warm", warm, source)
    what = ("SIIM sample chest X-rays (1024 px, JPEG Baseline)" if images is None
            else f"copies of the DICOM files in {images}")
    return files, warmup, what


# --------------------------------------------------------------------------- senders


@dataclass
class Sent:
    """One association's send: wall-clock start (for file mtimes) and its duration."""

    started_at: float
    seconds: float


def send_dcmtk(files: Sequence[Path], port: int, aec: str) -> Sent:
    """Send ``files`` with DCMTK storescu over one association (TCP_NODELAY=1)."""
    propose = STORESCU_PROPOSE.get(transfer_syntax(files[0]))
    cmd = storescu_command(files, port, aec, aet="MODALITY", propose=propose)
    started_at = time.time()
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=PEER_ENV, timeout=1800,
                         check=False)
    seconds = time.perf_counter() - start
    text = out.stdout + out.stderr
    if out.returncode != 0 or any(line[:2] in ("E:", "F:") for line in text.splitlines()):
        raise BenchmarkError(f"storescu to {aec} port {port} failed ({out.returncode}):\n"
                             f"{text[-1500:]}")
    return Sent(started_at, seconds)


def send_pynetdicom(files: Sequence[Path], port: int, aec: str) -> Sent:
    """Send ``files`` over one pynetdicom association (where DCMTK is not installed)."""
    import socket

    import pydicom
    from pynetdicom import AE, evt

    contexts: dict[str, set[str]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    ae = AE(ae_title="MODALITY")
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))

    def nodelay(event: Any) -> None:
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    started_at = time.time()
    start = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=aec,
                         evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        raise BenchmarkError(f"association to {aec} port {port} not established")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code != 0x0000:
                raise BenchmarkError(f"C-STORE of {path.name} to {aec} answered {code:#06x}")
    finally:
        assoc.release()
    return Sent(started_at, time.perf_counter() - start)


Sender = Callable[[Sequence[Path], int, str], Sent]


# --------------------------------------------------------------------------- receivers


class Destination(Protocol):
    """A receiver of the node's results (storescp or the pynetdicom sink)."""

    ae_title: str
    port: int

    def start(self) -> Any: ...
    def stop(self) -> None: ...
    def files(self) -> list[Path]: ...


def make_destination(folder: Path, python_peers: bool) -> Destination:
    """A fresh storescp (or pynetdicom sink) writing into ``folder``."""
    if python_peers:
        return SinkSCP(folder, free_port())
    return StoreSCP(folder, free_port())


# --------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    """One receiver set-up measured each round."""

    key: str
    label: str
    kind: str  # "orthanc", "ingest" (worker off) or "pipeline"
    env: dict[str, str] = field(default_factory=dict)
    processes: int | None = None  # worker.processes set for this run (None: node default)


@dataclass
class Measured:
    """One run of a configuration."""

    storescu_s: float
    pipeline_s: float | None = None
    states: dict[str, int] = field(default_factory=dict)


def config_check(config: Path, env: dict[str, str]) -> tuple[int, str]:
    """``pneumonode config check`` with ``env``: exit code and output."""
    out = subprocess.run(
        [sys.executable, "-m", "pneumonode", "--config", str(config), "config", "check"],
        capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO, timeout=300,
        check=False,
    )
    return out.returncode, out.stdout + out.stderr


def processes_support(folder: Path) -> tuple[bool, str, int | None]:
    """Whether the node knows ``worker.processes``; why not; its default value when it does."""
    folder.mkdir(parents=True, exist_ok=True)
    config = write_node_config(folder / "check.toml", port=free_port(), data_dir=folder / "data")
    code, text = config_check(config, {PROCESSES_ENV: "1"})
    if code != 0:
        last = [line for line in text.strip().splitlines() if line.strip()]
        why = last[-1].replace(f" in {config} +", "") if last else f"config check exited {code}"
        return False, why, None
    default = None
    code, text = config_check(config, {})
    if code == 0:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            body = text[: text.index("\ndatabase:")]
            default = int(json.loads(body)["worker"]["processes"])
    return True, "", default


def pipeline_configs(processes: Sequence[int], default_processes: int | None,
                     orthanc: bool, ingest: bool = True) -> list[Config]:
    """The configurations measured each round, in order."""
    configs: list[Config] = []
    if orthanc:
        configs.append(Config("orthanc", "Orthanc, store only", "orthanc"))
    if ingest:
        configs.append(Config("ingest", "pneumonode, worker off (ingest only)", "ingest",
                              {"PNEUMONODE_WORKER__ENABLED": "false"}))
    if default_processes is None or default_processes not in processes:
        configs.append(Config("pipeline", "pneumonode, defaults", "pipeline"))
    for n in processes:
        label = f"pneumonode, worker.processes={n}"
        if n == default_processes:
            label += " (the default)"
        configs.append(Config(f"processes={n}", label, "pipeline", {PROCESSES_ENV: str(n)}, n))
    return configs


# --------------------------------------------------------------------------- one run


def job_states(node: NodeProcess, data_dir: Path) -> dict[str, int]:
    """Jobs per state: read from the node's SQLite file (read-only), else ``jobs list``.

    The direct read costs milliseconds where ``pneumonode jobs list`` starts a Python process.
    """
    database = data_dir / "pneumonode.db"
    if database.is_file():
        with contextlib.suppress(sqlite3.Error):
            connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=10)
            try:
                rows = connection.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                return {str(state): int(n) for state, n in rows}
            finally:
                connection.close()
    return dict(Counter(str(j.get("state")) for j in node.jobs()))


def last_error(data_dir: Path) -> str:
    """The newest job error in the node's SQLite file ("" when none or unreadable)."""
    database = data_dir / "pneumonode.db"
    with contextlib.suppress(sqlite3.Error):
        connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            row = connection.execute(
                "SELECT id, last_error FROM jobs WHERE last_error IS NOT NULL AND last_error != ''"
                " ORDER BY id DESC LIMIT 1"
            ).fetchone()
        finally:
            connection.close()
        if row:
            return f"job {row[0]}: {str(row[1]).splitlines()[0][:300]}"
    return ""


def wait_until_final(
    node: NodeProcess, data_dir: Path, count: int, timeout: float
) -> dict[str, int]:
    """Poll the job states until ``count`` jobs are done, failed or skipped."""
    states: dict[str, int] = {}

    def final() -> bool:
        nonlocal states
        states = job_states(node, data_dir)
        return sum(states.get(s, 0) for s in FINAL_STATES) >= count

    try:
        wait_for(final, timeout, f"{count} jobs to finish", step=0.2)
    except BenchmarkError as exc:
        raise BenchmarkError(f"{exc} (states {states}; {last_error(data_dir)}); node log:\n"
                             f"{node.tail()}") from exc
    return states


def measure_pipeline(
    folder: Path,
    config: Config,
    files: list[Path],
    warmup: list[Path],
    *,
    send: Sender,
    python_peers: bool,
    timeout: float,
    model: Path | None = None,
) -> Measured:
    """A fresh destination and node; warm-up; then the timed association and its results."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = make_destination(folder / "dest", python_peers)
    data_dir = folder / "data"
    node_config = write_node_config(
        folder / "node.toml", port=free_port(), data_dir=data_dir,
        destinations=[(dest.ae_title, "127.0.0.1", dest.port)], model=model,
    )
    node = NodeProcess(node_config, folder / "node.log", env=config.env)
    with running(dest, node):
        if warmup:
            # Warm-up: loads and traces the model in every worker; tells how many results an
            # image gets (SEG, SC, SR as configured).
            send(warmup, node.port, "PNEUMONODE")
            states = wait_until_final(node, data_dir, len(warmup), timeout)
            if states.get("done", 0) != len(warmup):
                raise BenchmarkError(f"warm-up images ended {states} ({last_error(data_dir)}); "
                                     f"node log:\n{node.tail()}")
            time.sleep(0.3)
        before = {p.name for p in dest.files()}
        sent = send(files, node.port, "PNEUMONODE")
        if warmup:
            per_image = len(before) // len(warmup)
            if per_image < 1 or per_image * len(warmup) != len(before):
                raise BenchmarkError(f"{len(before)} results for {len(warmup)} warm-up images")
            expected = len(before) + per_image * len(files)
            try:
                wait_for(lambda: len(dest.files()) >= expected, timeout,
                         f"{expected - len(before)} results at the destination", step=0.1)
            except BenchmarkError as exc:
                raise BenchmarkError(f"{exc}; {len(dest.files()) - len(before)} arrived; "
                                     f"node log:\n{node.tail()}") from exc
        else:  # no warm-up: done when every job is (a job is done once delivered)
            wait_until_final(node, data_dir, len(files), timeout)
        time.sleep(0.3)  # the last file's writer closes it
        new = [p for p in dest.files() if p.name not in before]
        if not new:
            raise BenchmarkError(f"no results arrived; node log:\n{node.tail()}")
        last = max(p.stat().st_mtime for p in new)
        states = job_states(node, data_dir)
    return Measured(sent.seconds, last - sent.started_at, states)


def measure_store(folder: Path, config: Config, files: list[Path], send: Sender) -> Measured:
    """A fresh Orthanc, or node with its worker off; the storescu wall time of the set."""
    folder.mkdir(parents=True, exist_ok=True)
    if config.kind == "orthanc":
        orthanc = Orthanc(folder, free_port(), free_port())
        with running(orthanc):
            time.sleep(1.0)
            sent = send(files, orthanc.port, orthanc.ae_title)
            wait_for(lambda: orthanc.instance_count() >= len(files), 60,
                     "Orthanc to index every image", step=0.2)
        return Measured(sent.seconds)
    data_dir = folder / "data"
    node_config = write_node_config(folder / "node.toml", port=free_port(), data_dir=data_dir)
    node = NodeProcess(node_config, folder / "node.log", env=config.env)
    with running(node):
        time.sleep(1.0)
        sent = send(files, node.port, "PNEUMONODE")
        states = job_states(node, data_dir)
    if states.get("received", 0) != len(files):
        raise BenchmarkError(f"worker-off node holds jobs {states}, expected {len(files)} received")
    return Measured(sent.seconds, None, states)


# --------------------------------------------------------------------------- report


def rates_tables(
    configs: list[Config], runs: dict[str, list[Measured]], count: int,
    processes_note: str,
) -> tuple[Table, Table, dict[str, float]]:
    """The rate table (one row per configuration and timing) and the ratios against targets."""
    table = Table("Images/s per configuration (medians over rounds)",
                  ["configuration", "timed", "median s", "images/s", "runs (s)"])
    rate: dict[str, float] = {}
    for config in configs:
        measured = runs[config.key]
        if not measured:
            table.add(config.label, "no completed run (see below)", "", "", "")
            continue
        store = [m.storescu_s for m in measured]
        what = {"orthanc": "storescu wall time (store only)",
                "ingest": "storescu wall time (ingest only)",
                "pipeline": "storescu wall time (ingest, worker running)"}[config.kind]
        rate[f"{config.key}:store"] = count / median(store)
        if config.kind == "pipeline":
            whole = [m.pipeline_s or float("nan") for m in measured]
            rate[f"{config.key}:pipeline"] = count / median(whole)
            table.add(config.label, "first byte sent -> last result arrived", median(whole),
                      count / median(whole), ", ".join(f"{t:.2f}" for t in whole))
        table.add(config.label, what, median(store), count / median(store),
                  ", ".join(f"{t:.2f}" for t in store))
    ratios = Table("Ratios (medians)", ["ratio", "value", "target", "met"])
    default_key = next((c.key for c in configs if c.kind == "pipeline" and
                        (c.processes is None or "default" in c.label)), None)

    def add(name: str, num: str, den: str) -> None:
        target = TARGETS.get(name)
        if num in rate and den in rate:
            value = rate[num] / rate[den]
            met = "" if target is None else ("yes" if value >= target else "NO")
            ratios.add(name, value, "(reference)" if target is None else f">= {target:g}", met)

    if default_key is not None:
        add("pipeline / Orthanc store-only", f"{default_key}:pipeline", "orthanc:store")
        add("ingest with the worker running / Orthanc", f"{default_key}:store", "orthanc:store")
    add("ingest with the worker off / Orthanc", "ingest:store", "orthanc:store")
    if default_key is not None:
        add("ingest with the worker running / worker off", f"{default_key}:store",
            "ingest:store")
    if "processes=1:pipeline" in rate and "processes=2:pipeline" in rate:
        add("2 processes / 1 process (pipeline)", "processes=2:pipeline", "processes=1:pipeline")
    for config in configs:
        n = config.processes
        if n not in (None, 1, 2) and f"{config.key}:pipeline" in rate:
            add(f"{n} processes / 1 process (pipeline)", f"{config.key}:pipeline",
                "processes=1:pipeline")
    if processes_note:
        ratios.add("2 processes / 1 process (pipeline)", "not available", ">= 1.6", "")
        ratios.note = processes_note
    return table, ratios, rate


def job_note(configs: list[Config], runs: dict[str, list[Measured]]) -> str:
    """Job states after each pipeline run, when any ended other than done."""
    odd = []
    for config in configs:
        for i, m in enumerate(runs[config.key]):
            if config.kind == "pipeline" and set(m.states) - {"done"}:
                odd.append(f"{config.label} round {i + 1}: {m.states}")
    return ("Jobs not done after a pipeline run: " + "; ".join(odd)) if odd else ""


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline benchmark; print the tables and write ``results/pipeline.md``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100, help="images per run (default 100)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--processes", default="1,2",
                        help="worker.processes values to measure, comma-separated "
                             "(default 1,2; empty: none); skipped when the node lacks the setting")
    parser.add_argument("--no-orthanc", action="store_true", help="skip Orthanc")
    parser.add_argument("--no-ingest", action="store_true", help="skip the worker-off node")
    parser.add_argument("--warmup", type=int, default=-1,
                        help="warm-up images per node (default: 2, or 2 per worker process)")
    parser.add_argument("--images", type=Path, help="send copies of these DICOM files instead "
                        "of the SIIM samples")
    parser.add_argument("--synthetic", type=int, metavar="SIZE",
                        help="send synthetic DX images of SIZE px instead")
    parser.add_argument("--model", type=Path, help="model package (default: the bundled demo)")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="seconds to wait for a run's results (default max(180, 5 x count))")
    args = parser.parse_args(argv)
    try:
        processes = [int(x) for x in args.processes.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--processes {args.processes!r}: comma-separated integers expected")
    if args.count < 1 or args.rounds < 1:
        parser.error("--count and --rounds must be positive")
    timeout = args.timeout or max(180.0, 5.0 * args.count)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="pneumonode-bench-pipeline-") as tmp:
        root = Path(tmp)
        processes_note = ""
        default_processes = None
        if processes:
            ok, why, default_processes = processes_support(root / "check")
            if not ok:
                processes_note = (f"Scaling not available: this node has no worker.processes "
                                  f"setting (`pneumonode config check` with {PROCESSES_ENV}=1 "
                                  f"says: {why}).")
                say(processes_note)
                processes = []
        configs = pipeline_configs(processes, default_processes, not args.no_orthanc,
                                   not args.no_ingest)
        warm = args.warmup if args.warmup >= 0 else max(2, 2 * max(processes, default=1))
        files, warmup, what = make_inputs(root / "images", args.count, warm, args.images,
                                          args.synthetic)
        warm_page_cache(files + warmup)
        say(f"pipeline: {args.count} x {what}, {args.rounds} round(s), "
            f"{', '.join(c.key for c in configs)}; load "
            f"{info['load average at start (1, 5, 15 min)']}")
        runs: dict[str, list[Measured]] = {c.key: [] for c in configs}
        failures: dict[str, list[str]] = {c.key: [] for c in configs}
        for round_no in range(args.rounds):
            for config in configs:
                folder = root / f"round{round_no}" / config.key.replace("=", "")
                try:
                    if config.kind == "pipeline":
                        m = measure_pipeline(folder, config, files, warmup, send=send_dcmtk,
                                             python_peers=False, timeout=timeout,
                                             model=args.model)
                    else:
                        m = measure_store(folder, config, files, send_dcmtk)
                except BenchmarkError as exc:
                    first = str(exc).splitlines()[0][:300]
                    failures[config.key].append(f"round {round_no + 1}: {first}")
                    say(f"  round {round_no + 1} {config.label}: FAILED: {str(exc)[-4000:]}")
                    continue
                if config.kind == "pipeline":
                    say(f"  round {round_no + 1} {config.label}: storescu {m.storescu_s:.2f} s "
                        f"({args.count / m.storescu_s:.1f}/s), last result after "
                        f"{m.pipeline_s:.2f} s ({args.count / (m.pipeline_s or 1):.2f}/s)")
                else:
                    say(f"  round {round_no + 1} {config.label}: storescu {m.storescu_s:.2f} s "
                        f"({args.count / m.storescu_s:.1f}/s)")
                runs[config.key].append(m)
        megabytes = sum(p.stat().st_size for p in files) / 1e6

    table, ratios, _ = rates_tables(configs, runs, args.count, processes_note)
    table.note = (
        f"{args.count} x {what} ({megabytes:.0f} MB), one DCMTK storescu association "
        "(TCP_NODELAY=1) per run; receivers started fresh for every run, configurations "
        "interleaved within each round. pneumonode: `serve` with the "
        f"{'bundled demo model' if args.model is None else f'model {args.model}'} and its "
        "defaults, a DCMTK storescp as its one destination, warmed up with "
        f"{warm} other images before the timed run. Pipeline time: from just before storescu "
        "starts to the mtime of the last result file (SEG, SC, SR) at the storescp. Orthanc: "
        "Debian's, own configuration, SQLite index, SyncStorageArea (default)."
    )
    sections = [table.markdown(), ratios.markdown()]
    note = job_note(configs, runs)
    if note:
        sections.append(note)
    failed = [f"{c.label}, {line}" for c in configs for line in failures[c.key]]
    if failed:
        sections.append("Runs that failed (left out of the medians): " + "; ".join(failed))
    for block in sections:
        say()
        say(block)
    path = write_results("pipeline", "Pipeline: C-STORE to results delivered", command_line(),
                         info, sections)
    say(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
