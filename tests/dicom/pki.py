"""A throwaway PKI (CA, server, client, rogue client) made with the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    """PEM files: our CA, the node's (server) and a modality's (client) certificates, and a
    client certified by a CA nobody trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("openssl command not installed (Debian package openssl)")
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-addext", "basicConstraints=critical,CA:FALSE",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
             "-addext", f"extendedKeyUsage={usage}")
    return cert, key


def make_pki(folder: Path) -> Pki:
    """Create the CA, the node's and a modality's certificates and a rogue client in ``folder``."""
    ca = _ca(folder, "test-ca")
    rogue_ca = _ca(folder, "rogue-ca")
    server = _leaf(folder, "pneumonode", ca, "serverAuth,clientAuth")
    client = _leaf(folder, "modality", ca, "clientAuth,serverAuth")
    rogue = _leaf(folder, "intruder", rogue_ca, "clientAuth")
    return Pki(ca[0], *server, *client, *rogue)
