"""Shared benchmark helpers: machine facts, result tables, synthetic images, peer processes."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
#: Environment variable that sends result files elsewhere (the smoke tests use it).
RESULTS_ENV = "PNEUMONODE_BENCH_RESULTS"
#: The shared data folder beside the repository (real SIIM files); may be absent.
SHARED_DATA = REPO / ".." / "shared" / "data"
SIIM_DICOM = SHARED_DATA / "siim-sample" / "dicom"
#: DCMTK peers read TCP_NODELAY from the environment; every peer here runs with it.
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}
#: Order of the sections in RESULTS.md.
RESULT_ORDER = (
    "ingest", "sending", "latency", "pipeline", "inference", "gpu_inference", "gpu_pipeline"
)


class BenchmarkError(RuntimeError):
    """A benchmark cannot run or a peer misbehaved; the message says which and why."""


def run_main(main: Callable[[list[str] | None], int]) -> int:
    """Run a benchmark's ``main``; a :class:`BenchmarkError` becomes one line and exit code 1."""
    try:
        return main(None)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


def say(text: str = "") -> None:
    """Print one line of progress or a table (benchmarks are command-line programs)."""
    print(text, flush=True)


# --------------------------------------------------------------------------- machine and stats


def machine_info() -> dict[str, str]:
    """Facts about this machine and checkout, read at the start of a benchmark.

    Returns
    -------
    dict
        nproc, CPU model, RAM, load average, Python, Keras backend, commit, date (UTC).
    """
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        commit = head + (" (uncommitted changes)" if dirty else "")
    return {
        "date (UTC)": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "CPU": model,
        "RAM": ram,
        "load average at start (1, 5, 15 min)": load,
        "Python": sys.version.split()[0],
        "commit": commit,
    }


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --------------------------------------------------------------------------- tables and results


@dataclass
class Table:
    """A titled Markdown table."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""

    def add(self, *cells: object) -> None:
        """Append a row; floats are shown with 3 significant decimals where sensible."""
        self.rows.append([_cell(c) for c in cells])

    def markdown(self) -> str:
        """The table as Markdown, with its title as a heading and its note after it."""
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("| " + " | ".join("---" for _ in self.headers) + " |")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) >= 0.001 or value == 0 else f"{value:.2e}"
    return str(value).replace("|", "\\|")


def machine_markdown(info: dict[str, str]) -> str:
    """The machine facts as a Markdown list."""
    return "\n".join(f"- {key}: {value}" for key, value in info.items())


def results_dir() -> Path:
    """Where ``<name>.md`` files go: ``benchmarks/results`` unless $PNEUMONODE_BENCH_RESULTS."""
    override = os.environ.get(RESULTS_ENV)
    return Path(override) if override else BENCH_DIR / "results"


def results_file() -> Path:
    """``benchmarks/RESULTS.md``, or ``RESULTS.md`` inside $PNEUMONODE_BENCH_RESULTS."""
    override = os.environ.get(RESULTS_ENV)
    return Path(override) / "RESULTS.md" if override else BENCH_DIR / "RESULTS.md"


def write_results(
    name: str,
    title: str,
    command: str,
    info: dict[str, str],
    sections: Iterable[str],
) -> Path:
    """Write ``results/<name>.md`` and rebuild ``RESULTS.md`` from every result file.

    Parameters
    ----------
    name:
        File stem, e.g. ``"ingest"``.
    title:
        Heading of the section.
    command:
        The command line that produced it.
    info:
        :func:`machine_info` taken at the start.
    sections:
        Markdown blocks (tables, notes), in order.

    Returns
    -------
    pathlib.Path
        The result file.
    """
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    info = {**info, "load average at end": ", ".join(f"{x:.2f}" for x in os.getloadavg())}
    body = [
        f"## {title}",
        "",
        f"Command: `{command}`",
        "",
        machine_markdown(info),
        "",
        *[block + "\n" for block in sections],
    ]
    path = folder / f"{name}.md"
    path.write_text("\n".join(body).rstrip() + "\n", encoding="utf-8")
    rebuild_results_file()
    return path


def rebuild_results_file() -> None:
    """Collect the latest ``results/*.md`` into ``RESULTS.md`` (known benchmarks first)."""
    files = sorted(p for p in results_dir().glob("*.md") if p.name != "RESULTS.md")
    rank = {stem: i for i, stem in enumerate(RESULT_ORDER)}
    files.sort(key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
    parts = [
        "# Benchmark results",
        "",
        "The latest run of each script in `benchmarks/` (see `benchmarks/README.md`), with the",
        "machine it ran on. Generated by the scripts: do not edit by hand.",
        "",
    ]
    missing = [stem for stem in RESULT_ORDER if stem not in {p.stem for p in files}]
    if missing:
        parts += [f"Not run yet: {', '.join(f'`{m}.py`' for m in missing)} "
                  "(see benchmarks/README.md).", ""]
    for path in files:
        parts += [path.read_text(encoding="utf-8").rstrip(), ""]
    results_file().write_text("\n".join(parts), encoding="utf-8")


def command_line() -> str:
    """The command that runs this script, as a user types it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``predicate`` until true; raise :class:`BenchmarkError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise BenchmarkError(f"timed out after {timeout:.0f} s waiting for {what}")


def require_tool(tool: str, package: str) -> str:
    """Path of an installed program; raise naming the Debian package that provides it."""
    path = shutil.which(tool)
    if path is None:
        raise BenchmarkError(f"{tool} not installed (Debian package {package})")
    return path


def _terminate(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def write_node_config(
    path: Path,
    *,
    port: int,
    data_dir: Path,
    destinations: Sequence[tuple[str, str, int]] = (),
    model: Path | None = None,
) -> Path:
    """A node configuration on loopback, without the metrics endpoint (ports would clash).

    Everything else keeps the shipped defaults.
    """
    lines = [
        "[node]",
        'ae_title = "PNEUMONODE"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f'data_dir = "{data_dir}"',
        "[metrics]",
        "enabled = false",
    ]
    if model is not None:
        lines += ["[model]", f'path = "{model}"']
    for i, (ae, host, dport) in enumerate(destinations):
        lines += [
            "[[destinations]]",
            f'name = "dest{i}"',
            f'ae_title = "{ae}"',
            f'host = "{host}"',
            f"port = {dport}",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class NodeProcess:
    """``pneumonode serve`` in a subprocess, logging to a file.

    Parameters
    ----------
    config:
        Configuration file (see :func:`write_node_config`).
    log:
        File that receives the node's output.
    env:
        Extra environment variables (e.g. ``PNEUMONODE_WORKER__ENABLED=false``).
    """

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        text = config.read_text(encoding="utf-8")
        found = re.search(r"^port = (\d+)$", text, flags=re.MULTILINE)
        if found is None:
            raise BenchmarkError(f"{config} has no port")
        self.port = int(found.group(1))

    @property
    def pid(self) -> int:
        """Process id of the running node."""
        if self.proc is None:
            raise BenchmarkError("node not started")
        return self.proc.pid

    def start(self, timeout: float = 300.0) -> NodeProcess:
        """Start the node and wait until it listens."""
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pneumonode", "--config", str(self.config), "serve"],
                stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchmarkError(f"node exited with {proc.returncode}:\n{self.tail()}")
            return port_open(self.port)

        wait_for(ready, timeout, "pneumonode to listen", step=0.2)
        return self

    def tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the node's log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM, then wait for the drain."""
        _terminate(self.proc)

    def jobs(self) -> list[dict[str, Any]]:
        """``pneumonode jobs list --json``: every job."""
        out = subprocess.run(
            [sys.executable, "-m", "pneumonode", "--config", str(self.config),
             "jobs", "list", "--json", "--limit", "1000000"],
            capture_output=True, text=True, env=self.env, cwd=REPO, timeout=300, check=False,
        )
        if out.returncode != 0:
            raise BenchmarkError(f"pneumonode jobs list failed: {out.stderr.strip()[-500:]}")
        return list(json.loads(out.stdout))


class StoreSCP:
    """DCMTK ``storescp`` writing every received file into ``folder`` (no fsync: its default)."""

    def __init__(self, folder: Path, port: int, ae_title: str = "STORESCP") -> None:
        self.folder = folder
        self.port = port
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        """Start listening."""
        exe = require_tool("storescp", "dcmtk")
        log = self.folder.parent / f"storescp-{self.port}.log"
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [exe, "-aet", self.ae_title, "-od", str(self.folder), "+xa", str(self.port)],
                stdout=fh, stderr=subprocess.STDOUT, env=PEER_ENV,
            )
        wait_for(lambda: port_open(self.port), 30, "storescp to listen")
        return self

    def stop(self) -> None:
        """Terminate it."""
        _terminate(self.proc)

    def files(self) -> list[Path]:
        """Every file received so far."""
        return sorted(p for p in self.folder.iterdir() if p.is_file())


class Orthanc:
    """Debian's ``Orthanc`` with its own configuration and storage in ``folder``.

    Options not written here keep Orthanc's defaults (as in Debian's ``orthanc.json``):
    SQLite index, ``SyncStorageArea`` true (fsync of each stored file), no compression.
    """

    def __init__(self, folder: Path, dicom_port: int, http_port: int) -> None:
        self.folder = folder
        self.port = dicom_port
        self.http_port = http_port
        self.ae_title = "ORTHANC"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> Orthanc:
        """Write the configuration and start it; waits until both ports listen."""
        exe = require_tool("Orthanc", "orthanc")
        config = {
            "Name": "pneumonode-benchmark",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "Plugins": [],
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "TcpNoDelay": True,
        }
        path = self.folder / "config.json"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        with (self.folder / "orthanc.log").open("ab") as fh:
            self.proc = subprocess.Popen(
                [exe, str(path)], stdout=fh, stderr=subprocess.STDOUT, env=PEER_ENV,
                cwd=self.folder,
            )
        wait_for(
            lambda: port_open(self.port) and port_open(self.http_port), 60, "Orthanc to listen"
        )
        return self

    def stop(self) -> None:
        """Terminate it."""
        _terminate(self.proc)

    def instance_count(self) -> int:
        """Instances stored, from the REST API's /statistics."""
        import urllib.request

        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(json.loads(response.read())["CountInstances"])


class SinkSCP:
    """A pynetdicom receiver of every storage SOP class and transfer syntax, for machines
    without DCMTK: each data set written as it came (``<SOP Instance UID>.dcm``, no file meta,
    no fsync), under a temporary name first so that a counted file is complete.

    Runs ``python benchmarks/_common.py sink PORT FOLDER`` in a subprocess.
    """

    def __init__(self, folder: Path, port: int, ae_title: str = "STORESCP") -> None:
        self.folder = folder
        self.port = port
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> SinkSCP:
        """Start listening."""
        log = self.folder.parent / f"sink-{self.port}.log"
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "sink", "--port", str(self.port),
                 "--folder", str(self.folder), "--ae", self.ae_title],
                stdout=fh, stderr=subprocess.STDOUT,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchmarkError(f"the pynetdicom sink exited with {proc.returncode}: {log}")
            return port_open(self.port)

        wait_for(ready, 60, "the pynetdicom sink to listen")
        return self

    def stop(self) -> None:
        """Terminate it."""
        _terminate(self.proc)

    def files(self) -> list[Path]:
        """Every complete file received so far."""
        return sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix == ".dcm")


def serve_sink(port: int, folder: Path, ae_title: str) -> None:
    """The body of :class:`SinkSCP`: listen on loopback until terminated."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    folder.mkdir(parents=True, exist_ok=True)

    def nodelay(event: Any) -> None:
        transport = event.assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def store(event: Any) -> int:
        name = str(event.request.AffectedSOPInstanceUID)
        partial = folder / f".{name}.part"
        partial.write_bytes(event.request.DataSet.getvalue())
        os.replace(partial, folder / f"{name}.dcm")
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = 0
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ae.start_server(("127.0.0.1", port), block=True,
                    evt_handlers=[(evt.EVT_CONN_OPEN, nodelay), (evt.EVT_C_STORE, store)])


#: storescu's option that proposes a compressed transfer syntax (with the uncompressed ones).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu_command(
    files: Sequence[Path], port: int, aec: str, aet: str = "BENCH", propose: str | None = None
) -> list[str]:
    """The DCMTK ``storescu`` command line that sends ``files`` over one association."""
    exe = require_tool("storescu", "dcmtk")
    option = [propose] if propose else []
    return [exe, *option, "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)]


def run_storescu(
    files: Sequence[Path], port: int, aec: str, propose: str | None = None
) -> float:
    """Send ``files`` with ``storescu`` (TCP_NODELAY=1); returns its wall time in seconds.

    Raises
    ------
    BenchmarkError
        When storescu exits non-zero or reports a failed store.
    """
    cmd = storescu_command(files, port, aec, propose=propose)
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=PEER_ENV, timeout=900,
                         check=False)
    elapsed = time.perf_counter() - start
    text = out.stdout + out.stderr
    if out.returncode != 0 or re.search(r"^[EF]:", text, flags=re.MULTILINE):
        raise BenchmarkError(f"storescu to {aec} port {port} failed ({out.returncode}):\n"
                             f"{text[-1500:]}")
    return elapsed


def warm_page_cache(files: Iterable[Path]) -> None:
    """Read every file once so that no measured run pays for the first disk read."""
    for path in files:
        path.read_bytes()


@contextlib.contextmanager
def running(*peers: Any) -> Iterator[None]:
    """Start each peer (anything with start/stop) in order; stop them all on the way out."""
    started: list[Any] = []
    try:
        for peer in peers:
            peer.start()
            started.append(peer)
        yield
    finally:
        for peer in reversed(started):
            peer.stop()


# --------------------------------------------------------------------------- synthetic images


def chest_phantom(rows: int, columns: int, *, seed: int) -> Any:
    """A chest-like float image in [0, 1] (air, body, two lungs with ribs, mediastinum, heart).

    Adapted from the test suite's generator; deterministic for a seed.
    """
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    yy, xx = (yy + 0.5) / rows, (xx + 0.5) / columns

    def ellipse(cy: float, cx: float, ay: float, ax: float) -> Any:
        return ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 < 1.0

    image = np.full((rows, columns), 0.04)
    body = ellipse(0.52, 0.5, 0.55, 0.46)
    image[body] = 0.55
    lungs = ellipse(0.47, 0.31, 0.31, 0.15) | ellipse(0.47, 0.69, 0.31, 0.15)
    coarse = rng.normal(0.0, 1.0, size=(max(2, rows // 12), max(2, columns // 12)))
    texture = cv2.resize(coarse, (columns, rows), interpolation=cv2.INTER_CUBIC)
    ribs = 0.5 + 0.5 * np.cos(2.0 * np.pi * (yy * 9.0 + 1.5 * (xx - 0.5) ** 2))
    image[lungs] = 0.22 + 0.05 * texture[lungs] + 0.10 * ribs[lungs]
    image[(np.abs(xx - 0.5) < 0.09) & (yy > 0.12) & body] = 0.78
    image[ellipse(0.66, 0.55, 0.14, 0.13) & body] = 0.7
    image += rng.normal(0.0, 0.01, size=(rows, columns))
    return np.clip(image, 0.0, 1.0)


def make_dx(seed: int, size: int = 512, bits_stored: int = 12) -> Any:
    """A complete DX For Presentation chest image (Explicit VR Little Endian), unique UIDs.

    Parameters
    ----------
    seed:
        Seed of the phantom and part of every UID.
    size:
        Rows and columns.
    bits_stored:
        Bits stored (16 allocated).

    Returns
    -------
    pydicom.Dataset
        With file meta.
    """
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    def uid(*parts: object) -> str:
        return str(generate_uid(entropy_srcs=["pneumonode-benchmarks", *map(repr, parts)]))

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"
    pixels = np.rint(chest_phantom(size, size, seed=seed) * (2**bits_stored - 1))
    pixels = pixels.astype(np.uint16)
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid("sop", seed, size)
    ds.StudyInstanceUID = uid("study", seed)
    ds.SeriesInstanceUID = uid("series", seed)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = f"B{seed:06d}"
    ds.Modality = "DX"
    ds.Manufacturer = "pneumonode benchmark"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST PA"
    ds.PatientName = "BENCHMARK^SYNTHETIC"
    ds.PatientID = f"BENCH{seed:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.BurnedInAnnotation = "NO"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.DetectorType = "SCINTILLATOR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    ds.RescaleType = "US"
    ds.PixelSpacing = ds.ImagerPixelSpacing = ["0.2", "0.2"]
    ds.WindowCenter = f"{2 ** (bits_stored - 1)}"
    ds.WindowWidth = f"{2**bits_stored}"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write_dx_set(folder: Path, count: int, size: int = 512) -> list[Path]:
    """Write ``count`` synthetic DX files (seeds 0..count-1) into ``folder``; return their paths."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"dx{seed:05d}.dcm"
        pydicom.dcmwrite(path, make_dx(seed, size), enforce_file_format=True)
        paths.append(path)
    return paths


def copy_with_new_uids(source: Path, folder: Path, count: int, tag: str) -> list[Path]:
    """``count`` copies of a DICOM file, each with a new SOP Instance UID (pixels untouched).

    The node treats a repeated SOP Instance UID as a duplicate, so repeated sends need copies.
    """
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    paths = []
    for i in range(count):
        new = generate_uid()
        ds.SOPInstanceUID = new
        ds.file_meta.MediaStorageSOPInstanceUID = new
        path = folder / f"{tag}-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def transfer_syntax(path: Path) -> str:
    """The file's transfer syntax UID."""
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def main(argv: list[str] | None = None) -> int:
    """``rebuild``: regenerate RESULTS.md from results/*.md; ``sink``: see :class:`SinkSCP`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("action", choices=["rebuild", "sink"])
    parser.add_argument("--port", type=int, help="sink: loopback port")
    parser.add_argument("--folder", type=Path, help="sink: where received files go")
    parser.add_argument("--ae", default="STORESCP", help="sink: AE title (default STORESCP)")
    args = parser.parse_args(argv)
    if args.action == "sink":
        if args.port is None or args.folder is None:
            parser.error("sink needs --port and --folder")
        serve_sink(args.port, args.folder, args.ae)
        return 0
    rebuild_results_file()
    say(f"rebuilt {results_file()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
