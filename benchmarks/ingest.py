"""Ingest benchmark: one storescu association of N images into pneumonode, storescp and Orthanc."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import (
    BENCH_DIR,
    BenchmarkError,
    NodeProcess,
    Orthanc,
    StoreSCP,
    Table,
    command_line,
    free_port,
    machine_info,
    median,
    port_open,
    run_main,
    run_storescu,
    running,
    say,
    wait_for,
    warm_page_cache,
    write_dx_set,
    write_node_config,
    write_results,
)
from _profile import (
    Recorder,
    Sample,
    categories_table,
    threads_table,
    threads_with,
    top_functions_table,
    top_lines_table,
    total,
)

RECEIVERS = ("pneumonode", "storescp", "orthanc", "pynetdicom-bare")
DEFAULT_RECEIVERS = RECEIVERS


class PneumonodeReceiver:
    """``pneumonode serve`` with processing paused: durable intake only (fsync + commit)."""

    ae_title = "PNEUMONODE"

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.data_dir = folder / "data"
        config = write_node_config(folder / "node.toml", port=self.port, data_dir=self.data_dir)
        self.node = NodeProcess(
            config, folder / "node.log", env={"PNEUMONODE_WORKER__ENABLED": "false"}
        )

    def start(self) -> None:
        """Start the node and wait until it listens."""
        self.node.start()

    def stop(self) -> None:
        """Stop the node."""
        self.node.stop()

    def stored(self) -> int:
        """Files in the spool (the temporary ``incoming`` folder excluded)."""
        spool = self.data_dir / "spool"
        return sum(1 for p in spool.glob("*/*.dcm") if p.parent.name != "incoming")


class StoreSCPReceiver(StoreSCP):
    """DCMTK storescp writing into its own folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder / "files", free_port())

    def stored(self) -> int:
        """Files written."""
        return len(self.files())


class OrthancReceiver(Orthanc):
    """Orthanc with its own storage and index."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, free_port(), free_port())

    def stored(self) -> int:
        """Instances in its index."""
        return self.instance_count()


class BareReceiver:
    """A minimal pynetdicom receiver (``_bare_scp.py``): raw data set to a file, no fsync.

    The ceiling for any receiver built on pynetdicom on this machine.
    """

    ae_title = "BARE"

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "files"
        self.port = free_port()
        self.log = folder / "bare.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it listens."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, str(BENCH_DIR / "_bare_scp.py"), str(self.port),
                 str(self.folder)],
                stdout=fh, stderr=subprocess.STDOUT,
            )
        wait_for(lambda: port_open(self.port), 60, "the bare pynetdicom receiver to listen")

    def stop(self) -> None:
        """Terminate it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def stored(self) -> int:
        """Files written."""
        return sum(1 for _ in self.folder.iterdir())


Receiver = PneumonodeReceiver | StoreSCPReceiver | OrthancReceiver | BareReceiver
FACTORIES: dict[str, Callable[[Path], Receiver]] = {
    "pneumonode": PneumonodeReceiver,
    "storescp": StoreSCPReceiver,
    "orthanc": OrthancReceiver,
    "pynetdicom-bare": BareReceiver,
}


def fsync_probe(folder: Path, size: int, count: int = 30) -> tuple[float, float]:
    """Median ms of (write ``size`` bytes + fsync the file) and of (fsync the folder).

    What the disk under the node's data folder charges for the intake's durability.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    file_ms, dir_ms = [], []
    for i in range(count):
        path = folder / f"probe{i}.bin"
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        middle = time.perf_counter()
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        end = time.perf_counter()
        file_ms.append(1000 * (middle - start))
        dir_ms.append(1000 * (end - middle))
    return median(file_ms), median(dir_ms)


def _send(receiver: Receiver, files: list[Path]) -> float:
    seconds = run_storescu(files, receiver.port, receiver.ae_title)
    wait_for(lambda: receiver.stored() >= len(files), 30, "every image to be stored")
    if receiver.stored() != len(files):
        raise BenchmarkError(f"{type(receiver).__name__} stored {receiver.stored()} files, "
                             f"expected {len(files)}")
    return seconds


def _source_starts(prefix: str) -> Callable[[Sample], bool]:
    return lambda s: bool(s.frames) and s.frames[-1].source().startswith(prefix)


def association_rules() -> list[tuple[str, Callable[[Sample], bool]]]:
    """Where the association thread (DIMSE, handler, intake) spends its time."""
    return [
        ("intake: os.fsync of the spool file (header checked meanwhile on a pool thread)",
         lambda s: s.has("Intake._write_partial") and _source_starts("os.fsync")(s)),
        ("intake: write the spool file (name, open, write)",
         lambda s: s.has("Intake._write_partial")),
        ("intake: wait for the header checks (pool thread)",
         lambda s: s.has("Intake._receive") and s.has("Future.result")),
        ("intake: rename the spool file into its day folder", lambda s: s.has("Intake._spool")),
        ("intake: group commit: os.fsync of the spool folder",
         lambda s: s.has("GroupCommit._make_durable") and _source_starts("os.fsync")(s)),
        ("intake: group commit: SQLite COMMIT of the job rows",
         lambda s: s.has("enqueue_many") and s.has("do_commit")),
        ("intake: group commit: job row INSERT via SQLAlchemy (build, execute)",
         lambda s: s.has("enqueue_many")),
        ("intake: group commit: waiting for another association's group",
         lambda s: s.has("GroupCommit.commit") and s.has("Condition.wait")),
        ("intake: header checks, logging, metrics", lambda s: s.has("Intake.receive")
         or s.has("_ObservedIntake.receive")),
        ("handler: decode dataset (event.dataset)", lambda s: s.has("Event.dataset")),
        ("handler: re-encode as a file (event.encoded_dataset)",
         lambda s: s.has("Event.encoded_dataset")),
        ("handler: rest of handle_store", lambda s: s.has("handle_store")),
        ("pynetdicom: encode and send the C-STORE response", lambda s: s.has("send_msg")),
        ("idle: reactor poll sleep (time.sleep(0.001) per loop)",
         lambda s: s.has("_run_reactor") and _source_starts("time.sleep")(s)),
        ("idle: waiting on a queue", lambda s: s.has("Queue.get") or s.has("Condition.wait")),
        ("pynetdicom: reactor, DIMSE, state machine", lambda s: True),
    ]


def dul_rules() -> list[tuple[str, Callable[[Sample], bool]]]:
    """Where the DUL thread (socket reads, PDU and DIMSE decoding) spends its time."""
    return [
        ("idle: DUL poll sleep (time.sleep when no event)",
         lambda s: s.has("DULServiceProvider.run_reactor") and _source_starts("time.sleep")(s)),
        ("idle: select() on the socket (waiting for bytes)",
         lambda s: s.has("AssociationSocket.ready")),
        ("recv() from the socket", lambda s: s.has("AssociationSocket.recv")),
        ("decode DIMSE message (command set, dataset fragments)",
         lambda s: s.has("decode_msg") or s.has("message_to_primitive")),
        ("decode PDU (P-DATA-TF items)", lambda s: s.has("_decode_pdu")),
        ("state machine, events, other", lambda s: True),
    ]


def checker_rules() -> list[tuple[str, Callable[[Sample], bool]]]:
    """Where the header check threads spend their time."""
    return [
        ("read the instance (pydicom)", lambda s: s.has("read_instance")),
        ("check every element (VR, value)", lambda s: s.has("unreadable_element")),
        ("other checks, logging", lambda s: s.has("Intake._check")),
        ("idle: waiting for a header to check", lambda s: True),
    ]


def profile_pneumonode(
    folder: Path, files: list[Path], rate: int, keep: Path | None
) -> tuple[float, list[Table]]:
    """Send the images into a fresh node with py-spy attached; summarise the samples."""
    receiver = PneumonodeReceiver(folder)
    out = folder / "profile.txt"
    with running(receiver):
        time.sleep(1.0)
        recorder = Recorder(receiver.node.pid, out, rate=rate).start()
        try:
            seconds = _send(receiver, files)
        finally:
            samples = recorder.stop()
    if keep is not None:
        keep.write_bytes(out.read_bytes())
    acceptor = threads_with(samples, "handle_store")
    dul = threads_with(samples, "decode_msg") - acceptor
    assoc = [s for s in samples if s.tid in acceptor]
    reader = [s for s in samples if s.tid in dul]
    n = len(files)
    rules = association_rules()
    busy = [s for s in assoc if not any(rule(s) for name, rule in rules if name.startswith("idle"))]
    a_table = categories_table(
        assoc, rules, "Profile: association thread (DIMSE, C-STORE handler, intake)", rate, n,
        "image")
    a_table.note = (
        f"{total(assoc)} samples at {rate} Hz ({total(assoc) / rate:.2f} s) on the thread that "
        f"runs the handler; {n} images; storescu ran {seconds:.2f} s with py-spy attached."
    )
    d_table = categories_table(
        reader, dul_rules(), "Profile: DUL thread (socket reads, PDU and DIMSE decoding)", rate,
        n, "image")
    d_table.note = f"{total(reader)} samples ({total(reader) / rate:.2f} s)."
    checker = [s for s in samples if s.tid in threads_with(samples, "Intake._check") - acceptor]
    c_table = categories_table(
        checker, checker_rules(), "Profile: header check threads (while the file is written)",
        rate, n, "image")
    c_table.note = f"{total(checker)} samples ({total(checker) / rate:.2f} s)."
    tables = [
        a_table,
        d_table,
        c_table,
        top_lines_table(busy, "Profile: top lines by self time, association thread "
                        "(idle waits excluded)", rate),
        top_functions_table(
            busy, "Profile: top functions by inclusive time, association thread (same samples)",
            rate, include=lambda f: "threading.py" not in f.file, limit=15,
        ),
        threads_table(samples, "Profile: samples per thread (idle included)", rate),
    ]
    return seconds, tables


def main(argv: list[str] | None = None) -> int:
    """Run the ingest benchmark; print the tables and write ``results/ingest.md``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200, help="images per run (default 200)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--receivers", default=",".join(DEFAULT_RECEIVERS),
                        help="comma-separated subset of " + ",".join(RECEIVERS))
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy run")
    parser.add_argument("--keep-profile", type=Path, help="copy py-spy's raw stacks here")
    args = parser.parse_args(argv)
    receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    unknown = set(receivers) - set(RECEIVERS)
    if unknown or not receivers:
        parser.error(f"unknown receivers: {sorted(unknown)}")
    info = machine_info()
    say(f"ingest: {args.count} DX images {args.size}x{args.size}, {args.rounds} rounds, "
        f"load {info['load average at start (1, 5, 15 min)']}")
    with tempfile.TemporaryDirectory(prefix="pneumonode-bench-ingest-") as tmp:
        root = Path(tmp)
        files = write_dx_set(root / "images", args.count, args.size)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        image_bytes = files[0].stat().st_size
        warm_page_cache(files)
        times: dict[str, list[float]] = {name: [] for name in receivers}
        for round_no in range(args.rounds):
            peers = [FACTORIES[name](root / f"round{round_no}" / name) for name in receivers]
            with running(*peers):
                time.sleep(2.0)
                for name, peer in zip(receivers, peers, strict=True):
                    seconds = _send(peer, files)
                    times[name].append(seconds)
                    say(f"  round {round_no + 1} {name:<16} {seconds:7.3f} s "
                        f"{args.count / seconds:7.1f} images/s")
        file_ms, dir_ms = fsync_probe(root / "fsync-probe", image_bytes)
        profile_tables: list[Table] = []
        profiled = None
        if not args.no_profile and "pneumonode" in receivers:
            profiled, profile_tables = profile_pneumonode(
                root / "profile", files, args.profile_rate, args.keep_profile
            )
            say(f"  profiled pneumonode run {profiled:7.3f} s (py-spy attached)")

    rate = {name: args.count / median(times[name]) for name in receivers}
    table = Table(
        f"Ingest: {args.count} DX {args.size}x{args.size} ({megabytes:.0f} MB) over one "
        "storescu association",
        ["receiver", "median s", "images/s", "MB/s", "runs (s)"],
    )
    for name in receivers:
        table.add(name, median(times[name]), rate[name], megabytes / median(times[name]),
                  ", ".join(f"{t:.3f}" for t in times[name]))
    ratios = Table("Ratios (medians)", ["ratio", "value", "target", "met"])
    if "pneumonode" in rate:
        for other, target in (("orthanc", 1.0), ("storescp", 0.5)):
            if other in rate:
                value = rate["pneumonode"] / rate[other]
                ratios.add(f"pneumonode / {other}", value, f">= {target:g}",
                           "yes" if value >= target else "NO")
        if "pynetdicom-bare" in rate:
            ratios.add("pneumonode / pynetdicom-bare", rate["pneumonode"] / rate["pynetdicom-bare"],
                       "(reference)", "")
    table.note = (
        "pneumonode: `serve` with PNEUMONODE_WORKER__ENABLED=false (each image fsynced, renamed "
        "and its job row committed before the answer), max PDU 65536. storescp: `-od DIR +xa`, "
        "no fsync, max PDU 16384. Orthanc: own config, SQLite index, SyncStorageArea (default), "
        "max PDU 16384. pynetdicom-bare: benchmarks/_bare_scp.py, the received data set written "
        "as it came, no fsync, max PDU 65536 (the ceiling of a pynetdicom receiver). "
        "All with TCP_NODELAY=1; receivers started fresh each round, "
        "measured in turn (interleaved), while the others idle."
    )
    sections = [
        table.markdown(),
        ratios.markdown(),
        f"Disk under the data folders (measured after the rounds): write {image_bytes}"
        f" bytes + fsync {file_ms:.2f} ms, fsync of the folder {dir_ms:.2f} ms (medians of 30).",
    ]
    if profiled is not None:
        sections.append(
            f"Profiled run (py-spy at {args.profile_rate} Hz, --idle --nonblocking): "
            f"{profiled:.3f} s, {args.count / profiled:.1f} images/s."
        )
    sections += [t.markdown() for t in profile_tables]
    for block in sections:
        say()
        say(block)
    path = write_results("ingest", "Ingest", command_line(), info, sections)
    say(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
