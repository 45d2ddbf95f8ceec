"""Test harness: run the node, DCMTK storescp/storescu and wait for results, as real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIIM_DICOM = REPO.parent / "shared" / "data" / "siim-sample" / "dicom"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
"""Comprehensive 3D SR Storage: the node's TID 1500 measurement report."""
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def require(tool: str) -> str:
    """Path of a Debian tool, or skip naming the package that provides it."""
    path = shutil.which(tool)
    if path is None:
        package = {"storescu": "dcmtk", "storescp": "dcmtk", "dciodvfy": "dicom3tools"}.get(
            tool, tool
        )
        pytest.skip(f"{tool} not installed (Debian package {package}; scripts/test installs it)")
    return path


def write_config(
    path: Path,
    *,
    port: int,
    data_dir: Path,
    destinations: Sequence[tuple[str, str, int]] = (),
    extra: str = "",
) -> Path:
    """A node configuration for tests: loopback, fast retries, the given destinations."""
    lines = [
        "[node]",
        'ae_title = "PNEUMONODE"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f'data_dir = "{data_dir}"',
        "[worker]",
        "heartbeat_s = 1.0",
        "stale_after_s = 5.0",
        "poll_s = 0.5",
        "[delivery]",
        "retry_base_delay_s = 0.5",
        "retry_max_delay_s = 2.0",
        "max_attempts = 30",
        "acse_timeout_s = 5.0",
        "dimse_timeout_s = 10.0",
        "network_timeout_s = 10.0",
    ]
    for i, (ae, host, dport) in enumerate(destinations):
        lines += ["[[destinations]]", f'name = "dest{i}"', f'ae_title = "{ae}"',
                  f'host = "{host}"', f"port = {dport}"]
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


class NodeProcess:
    """``pneumonode serve`` in a subprocess, logging to a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = int(
            next(line.split("=")[1] for line in config.read_text().splitlines()
                 if line.startswith("port"))
        )

    def start(self, timeout: float = 120.0) -> NodeProcess:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pneumonode", "--config", str(self.config), "serve"],
                stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.tail()}")
            if port_open(self.port):
                return self
            time.sleep(0.2)
        raise AssertionError(f"node did not listen within {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a power cut of the process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pneumonode", "--config", str(self.config), *args],
            capture_output=True, text=True, env=self.env, cwd=REPO, timeout=120,
        )

    def jobs(self) -> list[dict[str, object]]:
        out = self.cli("jobs", "list", "--json", "--limit", "100000")
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout))


class StoreSCP:
    """DCMTK storescp as a destination PACS; files land in ``folder``."""

    def __init__(self, folder: Path, port: int, ae_title: str = "DEST") -> None:
        self.folder = folder
        self.port = port
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        exe = require("storescp")
        self.log = self.folder.parent / f"storescp-{self.port}.log"
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [exe, "-aet", self.ae_title, "-od", str(self.folder), "+xa", str(self.port)],
                stdout=fh, stderr=subprocess.STDOUT, env=PEER_ENV,
            )
        wait_for(lambda: port_open(self.port), 20, "storescp to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


#: storescu's option that proposes a compressed transfer syntax (plus the uncompressed ones).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


def storescu(files: Sequence[Path], port: int, aec: str = "PNEUMONODE",
             aet: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu, as a modality does: each file in its own transfer syntax
    (one association per syntax, since storescu proposes one compressed syntax at a time), with
    TCP_NODELAY=1. Returns the last failing run, or the last run when all succeed."""
    import pydicom

    exe = require("storescu")
    groups: dict[str, list[Path]] = {}
    for path in files:
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_PROPOSE.get(ts, "-x="), []).append(path)
    result: subprocess.CompletedProcess[str] | None = None
    for option, paths in groups.items():
        run = subprocess.run(
            [exe, option, "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, paths)],
            capture_output=True, text=True, env=PEER_ENV, timeout=300,
        )
        if result is None or result.returncode == 0:
            result = run
    assert result is not None
    return result


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """The lines dciodvfy reports as errors for a file, and its whole output."""
    exe = require("dciodvfy")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if line.lstrip().startswith("Error")]
    return errors, text


def make_tiny_package(folder: Path, members: int = 1, uid: str = "2.25.4242") -> Path:
    """A small untrained Attention U-Net package (64 px): fast to serve in process tests."""
    import keras

    from pneumonode.inference.card import InputSpec, ModelCard, Thresholds, TrainingInfo
    from pneumonode.nets.attention_unet import build_attention_unet

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(members):
        keras.utils.set_random_seed(k)
        name = f"member{k + 1}.keras"
        build_attention_unet(input_shape=(64, 64, 1), base_filters=2).save(folder / name)
        names.append(name)
    ModelCard(
        name="tiny-test", version="0.0.1", uid=uid, variant="attention_unet", demo=True,
        input=InputSpec(size=64), thresholds=Thresholds(top=0.55, bottom=0.45), members=names,
        training=TrainingInfo(recipe="test", data="untrained", epochs=0),
        intended_use="test fixture",
    ).save(folder)
    return folder
