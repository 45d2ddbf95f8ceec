"""Sampling profiles of a running process with py-spy, summarised into Markdown tables."""

from __future__ import annotations

import linecache
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import REPO, BenchmarkError, Table

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
_THREAD = re.compile(r"^thread \((?P<tid>[^)]*)\)(?:: (?P<name>.*))?$")


@dataclass(frozen=True)
class Frame:
    """One Python frame of a sample: function, file and line."""

    func: str
    file: str
    line: int

    @property
    def short_file(self) -> str:
        """The file relative to site-packages, the repository or the standard library."""
        text = self.file
        for marker in ("site-packages/", "dist-packages/"):
            if marker in text:
                return text.split(marker, 1)[1]
        try:
            return str(Path(text).resolve().relative_to(REPO))
        except ValueError:
            return Path(text).name

    def label(self) -> str:
        """``function (file:line)``."""
        return f"{self.func} ({self.short_file}:{self.line})"

    def source(self) -> str:
        """The source line, stripped (empty when unavailable)."""
        return linecache.getline(self.file, self.line).strip()


@dataclass(frozen=True)
class Sample:
    """A unique stack with the number of times it was seen (root first)."""

    thread: str
    tid: str
    frames: tuple[Frame, ...]
    count: int

    def has(self, needle: str) -> bool:
        """Whether any frame's ``function (file)`` contains ``needle``."""
        return any(needle in f"{f.func} ({f.file})" for f in self.frames)


def py_spy() -> str:
    """The py-spy executable (the venv's, else on PATH).

    Raises
    ------
    BenchmarkError
        When py-spy is not installed.
    """
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise BenchmarkError("py-spy not installed: .venv/bin/pip install py-spy")
    return found


class Recorder:
    """``py-spy record`` attached to a process, writing raw (folded) stacks.

    Every thread is sampled, idle ones too (``--idle``), so waits show where they happen.
    ``--nonblocking`` keeps the profiled process running between samples.
    """

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Recorder:
        """Attach and start sampling."""
        log = self.out.with_suffix(".log")
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [py_spy(), "record", "--pid", str(self.pid), "--rate", str(self.rate),
                 "--format", "raw", "--output", str(self.out), "--threads", "--idle",
                 "--nonblocking", "--full-filenames"],
                stdout=fh, stderr=subprocess.STDOUT,
            )
        time.sleep(1.0)
        if self.proc.poll() is not None:
            raise BenchmarkError(f"py-spy could not attach: {log.read_text(errors='replace')}")
        return self

    def stop(self) -> list[Sample]:
        """Stop sampling (SIGINT makes py-spy write its file) and return the samples."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return parse(self.out)


def parse(path: Path) -> list[Sample]:
    """Read py-spy's raw output: ``thread (tid): name;frame;frame;... count`` per line."""
    if not path.exists():
        raise BenchmarkError(f"py-spy wrote no profile at {path}")
    samples = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = tid = "?"
        found = _THREAD.match(parts[0])
        if found is not None:
            tid = found.group("tid")
            thread = found.group("name") or tid
            parts = parts[1:]
        frames = []
        for part in parts:
            match = _FRAME.match(part)
            if match is not None:
                frames.append(Frame(match["func"], match["file"], int(match["line"])))
        samples.append(Sample(thread, tid, tuple(frames), int(count)))
    return samples


def thread_group(name: str) -> str:
    """A thread name without the numbers and timestamps that make each thread unique."""
    return re.sub(r"[@:(]?[0-9][0-9a-fx_:.\- ]*\)?", "", name).strip() or name


def threads_with(samples: Iterable[Sample], needle: str) -> set[str]:
    """Ids of the threads that have at least one stack with a frame matching ``needle``."""
    return {s.tid for s in samples if s.has(needle)}


def leaf_is(func: str, file_end: str, line: int | None = None) -> Callable[[Sample], bool]:
    """A rule: the innermost frame is ``func`` in a file ending with ``file_end`` (at ``line``)."""

    def rule(sample: Sample) -> bool:
        if not sample.frames:
            return False
        leaf = sample.frames[-1]
        return (leaf.func == func and leaf.file.endswith(file_end)
                and (line is None or leaf.line == line))

    return rule


def total(samples: Iterable[Sample]) -> int:
    """Number of samples."""
    return sum(s.count for s in samples)


def threads_table(samples: Sequence[Sample], title: str, rate: int) -> Table:
    """Samples (and seconds) per thread group, idle time included."""
    counts: Counter[str] = Counter()
    for s in samples:
        counts[thread_group(s.thread)] += s.count
    table = Table(title, ["thread", "samples", "seconds"])
    for name, n in counts.most_common():
        table.add(name, n, n / rate)
    return table


def categories_table(
    samples: Sequence[Sample],
    rules: Sequence[tuple[str, Callable[[Sample], bool]]],
    title: str,
    rate: int,
    per: int,
    per_label: str,
) -> Table:
    """Share of samples by the first rule that matches each stack (``unclassified`` if none).

    ``per``: the number of images, to show milliseconds per image.
    """
    counts: Counter[str] = Counter()
    for s in samples:
        label = next((name for name, rule in rules if rule(s)), "unclassified")
        counts[label] += s.count
    n = total(samples) or 1
    table = Table(title, ["where", "samples", "share", f"ms per {per_label}"])
    for name in [name for name, _ in rules] + ["unclassified"]:
        if counts[name]:
            table.add(name, counts[name], f"{100 * counts[name] / n:.1f}%",
                      1000 * counts[name] / rate / max(per, 1))
    return table


def top_lines_table(samples: Sequence[Sample], title: str, rate: int, limit: int = 15) -> Table:
    """The leaf frames (self time, with their source line) that hold the most samples."""
    counts: Counter[Frame] = Counter()
    for s in samples:
        if s.frames:
            counts[s.frames[-1]] += s.count
    n = total(samples) or 1
    table = Table(title, ["self samples", "share", "seconds", "frame", "source line"])
    for frame, k in counts.most_common(limit):
        table.add(k, f"{100 * k / n:.1f}%", k / rate, frame.label(), f"`{frame.source()}`")
    return table


def top_functions_table(
    samples: Sequence[Sample],
    title: str,
    rate: int,
    include: Callable[[Frame], bool],
    limit: int = 20,
) -> Table:
    """Inclusive samples per function (each counted once per stack), for chosen frames."""
    counts: Counter[tuple[str, str]] = Counter()
    for s in samples:
        seen = {(f.func, f.short_file) for f in s.frames if include(f)}
        for key in seen:
            counts[key] += s.count
    n = total(samples) or 1
    table = Table(title, ["inclusive samples", "share", "seconds", "function"])
    for (func, file), k in counts.most_common(limit):
        table.add(k, f"{100 * k / n:.1f}%", k / rate, f"{func} ({file})")
    return table
