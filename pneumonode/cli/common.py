"""What every command shares: exit codes, the one-line error, settings, logging, the database."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from datetime import datetime
from typing import Any

from pneumonode.dicom.log_escape import safe_handler
from pneumonode.settings import ConfigError, Settings, load_settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_NETWORK = 4
EXIT_DATABASE = 5


class CliError(Exception):
    """An expected failure: printed as one line, then the process exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def settings_of(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from exc


def configure_logging(level: str) -> None:
    """Log to stderr, one line per record, with no control characters from the network."""
    handler = safe_handler(
        logging.StreamHandler(sys.stderr),
        "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
    )
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    logging.captureWarnings(True)  # warnings go through the same escaping formatter
    for noisy in ("pynetdicom", "apscheduler", "highdicom", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # pydicom logs, and warns, once per invalid element of every malformed data set it reads;
    # intake reports the refusal itself, in one line. pydicom sets its logger's level when it is
    # first imported, so it is imported before the level is set.
    import pydicom.config  # noqa: F401

    logging.getLogger("pydicom").setLevel(max(logging.ERROR, logging.getLogger().level))
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


def import_keras(verbose: bool) -> None:
    """Import Keras (and TensorFlow) once, without TensorFlow's start-up noise unless verbose.

    TensorFlow's C++ runtime writes an absl/oneDNN/CPU-feature block straight to file
    descriptor 2 while it loads (twice, once per library), before any Python logging setting
    can reach it. Unless ``--verbose``, that descriptor points to /dev/null for the import
    only; an import error is still raised, and reported, afterwards.
    """
    if verbose or "keras" in sys.modules:
        import keras
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def database_error(settings: Settings, exc: Exception) -> str:
    from sqlalchemy.engine import make_url

    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).strip().splitlines() or [type(exc).__name__])[0]
    return f"database {shown}: {first}"


def engine_of(settings: Settings) -> Any:
    from pneumonode.queue.db import make_engine

    try:
        return make_engine(settings.database_url)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from exc


def fmt(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)
