"""Safe, quiet defaults: warnings for an open listener, strict TOML types, "did you mean",
no traceback on a closed pipe, ``model info`` without TensorFlow, routing settings checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO

from pneumonode.results import ResultKind
from pneumonode.settings import ConfigError, Settings, load_settings


def run(*args: str, env: dict[str, str] | None = None,
        stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pneumonode", *args], stdout=stdout, stderr=subprocess.PIPE,
        text=True, cwd=REPO, timeout=120, env={**os.environ, **(env or {})},
    )


def test_listening_beyond_loopback_without_an_allowlist_is_warned() -> None:
    assert any("node.allowed_calling_aets is empty" in w for w in Settings().warnings())
    local = Settings(node={"host": "127.0.0.1"})
    assert not any("allowed_calling_aets" in w for w in local.warnings())
    listed = Settings(node={"allowed_calling_aets": ["CR1"]})
    assert not any("allowed_calling_aets" in w for w in listed.warnings())
    result = run("config", "check")
    assert result.returncode == 0, result.stderr
    assert "warning: node.host = '0.0.0.0' listens beyond this machine" in result.stdout
    assert "decision threshold:" in result.stdout


def test_strings_for_numbers_in_the_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[node]\nport = "104"\n[worker]\nenabled = "false"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "node.port: must be a TOML int, not the string '104'" in str(caught.value)
    assert "worker.enabled: must be a TOML bool, not the string 'false'" in str(caught.value)
    # the environment is text by nature: numbers given there still convert
    config.write_text("[node]\nport = 104\n")
    os.environ["PNEUMONODE_NODE__PORT"] = "11113"
    try:
        assert load_settings(config).node.port == 11113
    finally:
        del os.environ["PNEUMONODE_NODE__PORT"]


def test_unknown_keys_get_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        "[node]\nae_titel = 'X'\n[[destinations]]\nname = 'pacs'\nae_title = 'PACS'\n"
        "host = 'h'\nport = 104\nonly_positiv = true\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "node.ae_titel: Extra inputs are not permitted; did you mean 'ae_title'?" in str(
        caught.value
    )
    assert "did you mean 'only_positive'?" in str(caught.value)


def test_routing_settings_are_checked() -> None:
    pacs = {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}
    settings = Settings(destinations=[{**pacs, "objects": ["sc", "sr"], "only_positive": True}])
    assert settings.destinations[0].objects == (ResultKind.SC, ResultKind.SR)
    with pytest.raises(ValueError, match="never receive anything"):
        Settings(output={"sc": False}, destinations=[{**pacs, "objects": ["sc"]}])
    with pytest.raises(ValueError, match=r"output\.sr = true needs output\.seg"):
        Settings(output={"seg": False})
    with pytest.raises(ValueError, match="must not repeat"):
        Settings(destinations=[{**pacs, "objects": ["sr", "sr"]}])


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``pneumonode jobs list | head``: the reader is gone before the command writes."""
    env = {"PNEUMONODE_NODE__DATA_DIR": str(tmp_path / "data")}
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pneumonode", "jobs", "list"], stdout=write_end,
            stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120, env={**os.environ, **env},
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == 0


def test_model_info_does_not_load_tensorflow() -> None:
    code = (
        "import sys; from pneumonode.cli import main; rc = main(['model', 'info']); "
        "print('loaded' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'not', rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.stdout.strip().endswith("not 0"), result.stdout + result.stderr
    assert "pneumonode-demo" in result.stdout


def test_tensorflow_start_up_noise_is_hidden_unless_verbose(tmp_path: Path) -> None:
    quiet = run("model", "check")
    assert quiet.returncode == 0, quiet.stderr
    assert "oneDNN" not in quiet.stderr and "absl::InitializeLog" not in quiet.stderr
    loud = run("--verbose", "model", "check")
    assert loud.returncode == 0 and "oneDNN" in loud.stderr
