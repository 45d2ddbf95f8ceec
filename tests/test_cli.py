"""The pneumonode command: one-line errors with exit codes, echo and send against DCMTK."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import synthetic
from harness import REPO, StoreSCP, free_port, wait_for


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pneumonode", *args],
        capture_output=True, text=True, cwd=REPO, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("pneumonode: error")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_value_is_one_line_naming_key_and_rule(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[node]\nport = 70000\n")
    result = run("--config", str(config), "config", "check")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "node.port" in line and "65535" in line and "70000" in line


def test_unknown_key_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[node]\nae_titel = 'X'\n")
    line = one_line_error(run("--config", str(config), "config", "check"))
    assert "node.ae_titel" in line


def test_missing_config_file_is_one_line() -> None:
    result = run("--config", "/nonexistent/pneumonode.toml", "serve")
    assert result.returncode == 2
    assert "configuration file not found" in one_line_error(result)


def test_environment_overrides_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[node]\nport = 12000\n")
    result = run("--config", str(config), "config", "check",
                 env={"PNEUMONODE_NODE__PORT": "12001"})
    assert result.returncode == 0, result.stderr
    assert '"port": 12001' in result.stdout


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    result = run("serve", env={"PNEUMONODE_MODEL__PATH": str(tmp_path / "nomodel"),
                               "PNEUMONODE_NODE__DATA_DIR": str(tmp_path / "data"),
                               "PNEUMONODE_NODE__PORT": str(free_port())})
    assert result.returncode == 3
    assert "cannot load model" in one_line_error(result)


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", env={"PNEUMONODE_NODE__PORT": str(port),
                                   "PNEUMONODE_NODE__HOST": "127.0.0.1",
                                   "PNEUMONODE_WORKER__ENABLED": "false",
                                   "PNEUMONODE_NODE__DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 4
    assert f"port {port} on 127.0.0.1 is already in use" in one_line_error(result)


def test_echo_and_send_to_storescp(tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    try:
        echo = run("echo", "127.0.0.1", str(dest.port), "--aec", "DEST")
        assert echo.returncode == 0, echo.stderr
        assert "status 0x0000" in echo.stdout
        folder = tmp_path / "in"
        folder.mkdir()
        for i in range(3):
            synthetic.write(synthetic.make_radiograph(rows=32, columns=32, seed=i),
                            folder / f"{i}.dcm")
        (folder / "notes.txt").write_text("not DICOM")
        sent = run("send", str(folder), "--host", "127.0.0.1", "--port", str(dest.port),
                   "--aec", "DEST")
        assert sent.returncode == 0, sent.stderr
        assert "sent 3 of 3" in sent.stdout
        wait_for(lambda: len(dest.files()) == 3, 20, "3 files at storescp")
    finally:
        dest.stop()


def test_echo_to_nobody_is_one_line() -> None:
    result = run("echo", "127.0.0.1", str(free_port()))
    assert result.returncode == 4
    assert "cannot associate" in one_line_error(result)
