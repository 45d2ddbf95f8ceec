"""TLS contexts for DICOM (PS3.15 B.9, BCP 195): TLS 1.2 or later, AEAD cipher suites only."""

from __future__ import annotations

import ssl
from pathlib import Path

from pneumonode.settings import TlsSettings

__all__ = ["BCP195_CIPHERS", "TlsError", "client_context", "server_context"]

#: TLS 1.2 cipher suites of the BCP 195 profile (RFC 9325 4.2): forward secrecy with AES-GCM.
#: TLS 1.3 suites are OpenSSL's defaults, all of them AEAD.
BCP195_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    ]
)


class TlsError(OSError):
    """A TLS file that cannot be used; the message names the key, the file and the reason."""


def _base(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    """A context trusting nothing yet (no system CA store: only the configured CAs count)."""
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, cfg: TlsSettings) -> None:
    if cfg.certificate is None or cfg.private_key is None:
        return
    for key, path in (("tls.certificate", cfg.certificate), ("tls.private_key", cfg.private_key)):
        if not path.is_file():
            raise TlsError(f"{key}: no such file: {path}")
    try:
        context.load_cert_chain(certfile=cfg.certificate, keyfile=cfg.private_key)
    except ssl.SSLError as exc:
        raise TlsError(
            f"tls.certificate/tls.private_key: cannot use {cfg.certificate} with "
            f"{cfg.private_key}: {exc.reason or exc}"
        ) from exc


def _load_cas(context: ssl.SSLContext, path: Path) -> None:
    if not path.is_file():
        raise TlsError(f"tls.ca_certificates: no such file: {path}")
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsError(
            f"tls.ca_certificates: {path} holds no usable PEM certificate: {exc.reason or exc}"
        ) from exc


def server_context(cfg: TlsSettings) -> ssl.SSLContext:
    """The context the listener wraps accepted connections in.

    Parameters
    ----------
    cfg:
        The ``[tls]`` settings; ``certificate`` and ``private_key`` are required.

    Returns
    -------
    ssl.SSLContext
        TLS 1.2+, BCP 195 ciphers; client certificates verified against ``ca_certificates`` and
        required when ``require_client_certificate`` is set (optional when only the CA is given).

    Raises
    ------
    TlsError
        When a file is missing or not a usable certificate or key.
    """
    if cfg.certificate is None:
        raise TlsError("tls.certificate: a TLS listener needs a certificate and private key")
    context = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, cfg)
    if cfg.ca_certificates is not None:
        _load_cas(context, cfg.ca_certificates)
        context.verify_mode = (
            ssl.CERT_REQUIRED if cfg.require_client_certificate else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(cfg: TlsSettings) -> ssl.SSLContext:
    """The context used to send to a destination over TLS.

    The server certificate must chain to ``ca_certificates`` (and name the host unless
    ``check_hostname`` is false); our own certificate, when configured, is offered as the
    client certificate.

    Parameters
    ----------
    cfg:
        The ``[tls]`` settings; ``ca_certificates`` is required.

    Returns
    -------
    ssl.SSLContext
        TLS 1.2+, BCP 195 ciphers, server verification on.

    Raises
    ------
    TlsError
        When a file is missing or not a usable certificate or key.
    """
    if cfg.ca_certificates is None:
        raise TlsError("tls.ca_certificates: sending over TLS needs the CA to verify servers")
    context = _base(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = cfg.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_cas(context, cfg.ca_certificates)
    _load_chain(context, cfg)
    return context
