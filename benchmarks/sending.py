"""Sending benchmark: pneumonode's C-STORE sender against DCMTK storescu into one storescp."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import (
    BenchmarkError,
    StoreSCP,
    Table,
    command_line,
    free_port,
    machine_info,
    median,
    run_main,
    run_storescu,
    running,
    say,
    wait_for,
    warm_page_cache,
    write_dx_set,
    write_results,
)
from _profile import (
    Recorder,
    Sample,
    categories_table,
    threads_with,
    top_functions_table,
    top_lines_table,
    total,
)

SENDERS = ("pneumonode", "storescu")


def send_with_pneumonode(files: list[Path], port: int, ae_title: str) -> float:
    """``pneumonode.dicom.scu.store`` of every file over one association; wall seconds.

    Raises
    ------
    BenchmarkError
        When an instance is not stored.
    """
    from pneumonode.dicom.scu import Remote, store

    start = time.perf_counter()
    outcomes = store(files, "BENCH", Remote(ae_title, "127.0.0.1", port))
    elapsed = time.perf_counter() - start
    failed = [o for o in outcomes if not o.ok]
    if failed or len(outcomes) != len(files):
        raise BenchmarkError(f"pneumonode sender: {len(failed)} of {len(files)} not stored")
    return elapsed


def _measure(sender: str, files: list[Path], folder: Path) -> float:
    scp = StoreSCP(folder, free_port())
    with running(scp):
        if sender == "pneumonode":
            seconds = send_with_pneumonode(files, scp.port, scp.ae_title)
        else:
            seconds = run_storescu(files, scp.port, scp.ae_title)
        wait_for(lambda: len(scp.files()) >= len(files), 30, "storescp to write every file")
    return seconds


def sender_rules() -> list[tuple[str, Callable[[Sample], bool]]]:
    """Where the sending process spends its time, most specific first."""
    return [
        ("read the files (dcmread)", lambda s: s.has("dcmread")),
        ("read the files (file meta, data set bytes)", lambda s: s.has("EncodedFile.")),
        ("associate and release", lambda s: s.has("ApplicationEntity.associate")
         or s.has("Association.release")),
        ("encode the dataset (pydicom write)", lambda s: s.has("encode (")
         or s.has("write_dataset")),
        ("build and send P-DATA PDUs", lambda s: s.has("send_msg") or s.has("send_pdu")
         or s.has("encode_msg")),
        ("wait for the C-STORE response", lambda s: s.has("get_msg") or s.has("Queue.get")
         or s.has("Condition.wait")),
        ("poll sleeps (time.sleep)", lambda s: bool(s.frames)
         and s.frames[-1].source().startswith("time.sleep")),
        ("other pynetdicom and pneumonode code", lambda s: True),
    ]


def sender_dul_rules() -> list[tuple[str, Callable[[Sample], bool]]]:
    """Where the sender's DUL thread (PDU encoding, socket writes and reads) spends its time."""
    return [
        ("idle: poll sleep (time.sleep when no event)", lambda s: bool(s.frames)
         and s.frames[-1].source().startswith("time.sleep")),
        ("idle: waiting on the socket and queues (poll)", lambda s: s.has("wait_readable")),
        ("idle: select() on the socket", lambda s: s.has("AssociationSocket.ready")),
        ("encode and send PDUs", lambda s: s.has("_process_recv_primitive")
         or s.has("AssociationSocket.send")),
        ("receive and decode PDUs (responses)", lambda s: s.has("_is_transport_event")),
        ("state machine, events, other", lambda s: True),
    ]


def profile_sender(files: list[Path], folder: Path, rate: int) -> tuple[float, list[Table]]:
    """Run the pneumonode sender in a child process under py-spy; summarise its main thread."""
    scp = StoreSCP(folder / "received", free_port())
    out = folder / "profile.txt"
    with running(scp):
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(scp.port), str(files[0].parent)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        ready = proc.stdout.readline()
        if not ready.startswith("ready"):
            raise BenchmarkError(f"sender child did not start: {ready!r}")
        recorder = Recorder(proc.pid, out, rate=rate).start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        seconds = float(proc.stdout.readline())
        samples = recorder.stop()
        proc.wait(30)
    main = threads_with(samples, "send_with_pneumonode")
    dul = (threads_with(samples, "DULServiceProvider.run_reactor")
           | threads_with(samples, "EventDrivenDUL.run_reactor")) - main
    mine = [s for s in samples if s.tid in main and s.has("send_with_pneumonode")]
    reader = [s for s in samples if s.tid in dul]
    n = len(files)
    table = categories_table(mine, sender_rules(), "Profile: the sending thread", rate, n,
                             "image")
    table.note = (f"{total(mine)} samples at {rate} Hz; {n} images; the send took {seconds:.2f} s "
                  "with py-spy attached.")
    busy = [s for s in mine if not s.has("Condition.wait")]
    d_table = categories_table(reader, sender_dul_rules(), "Profile: the sender's DUL thread",
                               rate, n, "image")
    return seconds, [
        table,
        d_table,
        top_lines_table(busy, "Profile: top lines by self time, sending thread (waits excluded)",
                        rate),
        top_functions_table(busy, "Profile: top functions by inclusive time, sending thread",
                            rate, include=lambda f: "threading.py" not in f.file, limit=15),
    ]


def _child(port: int, folder: Path) -> int:
    """Wait for "go" on stdin, send the folder's files, print the seconds it took."""
    import pneumonode.dicom.scu  # noqa: F401 - imported before timing starts

    files = sorted(folder.glob("*.dcm"))
    say("ready")
    sys.stdin.readline()
    say(f"{send_with_pneumonode(files, port, 'STORESCP'):.6f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the sending benchmark; print the tables and write ``results/sending.md``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200, help="images per run (default 200)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy run")
    parser.add_argument("--child", nargs=2, metavar=("PORT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(int(args.child[0]), Path(args.child[1]))
    info = machine_info()
    say(f"sending: {args.count} DX images {args.size}x{args.size}, {args.rounds} rounds, "
        f"load {info['load average at start (1, 5, 15 min)']}")
    import pneumonode.dicom.scu  # noqa: F401 - the import is not part of the timing

    with tempfile.TemporaryDirectory(prefix="pneumonode-bench-sending-") as tmp:
        root = Path(tmp)
        files = write_dx_set(root / "images", args.count, args.size)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        warm_page_cache(files)
        times: dict[str, list[float]] = {name: [] for name in SENDERS}
        for round_no in range(args.rounds):
            for name in SENDERS:
                seconds = _measure(name, files, root / f"round{round_no}" / name)
                times[name].append(seconds)
                say(f"  round {round_no + 1} {name:<10} {seconds:7.3f} s "
                    f"{args.count / seconds:7.1f} images/s")
        profile_tables: list[Table] = []
        if not args.no_profile:
            profiled, profile_tables = profile_sender(files, root / "profile", args.profile_rate)
            say(f"  profiled pneumonode send {profiled:7.3f} s (py-spy attached)")

    rate = {name: args.count / median(times[name]) for name in SENDERS}
    table = Table(
        f"Sending: {args.count} DX {args.size}x{args.size} ({megabytes:.0f} MB) into storescp "
        "over one association",
        ["sender", "median s", "images/s", "MB/s", "runs (s)"],
    )
    for name in SENDERS:
        table.add(name, median(times[name]), rate[name], megabytes / median(times[name]),
                  ", ".join(f"{t:.3f}" for t in times[name]))
    table.note = (
        "pneumonode: `pneumonode.dicom.scu.store` called in this process (reads every file's "
        "meta information, then one association; each data set sent as encoded on disk when "
        "its transfer syntax is accepted; pynetdicom's default max PDU). storescu: DCMTK, one "
        "association, process start included. Both with TCP_NODELAY; a fresh "
        "`storescp -od DIR +xa` for each run, runs interleaved."
    )
    ratios = Table("Ratio (medians)", ["ratio", "value"])
    ratios.add("pneumonode / storescu", rate["pneumonode"] / rate["storescu"])
    sections = [table.markdown(), ratios.markdown(), *[t.markdown() for t in profile_tables]]
    for block in sections:
        say()
        say(block)
    path = write_results("sending", "Sending", command_line(), info, sections)
    say(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
