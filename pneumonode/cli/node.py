"""The node's own commands: serve it, see its status, check its configuration and model."""

from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path
from typing import Any

from pneumonode.cli.common import (
    EXIT_DATABASE,
    EXIT_FAILURE,
    EXIT_MODEL,
    EXIT_NETWORK,
    EXIT_OK,
    CliError,
    database_error,
    engine_of,
    fmt,
    import_keras,
    settings_of,
)
from pneumonode.settings import Settings, load_settings

HEALTH_TIMEOUT_S = 5.0
"""How long ``pneumonode status`` waits for the node's /healthz."""


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node in the foreground until SIGTERM/SIGINT."""
    settings = settings_of(args)
    if settings.worker.enabled and settings.worker.processes == 0:
        import_keras(args.verbose)  # the model runs in this process (else in worker processes)
    from sqlalchemy.exc import SQLAlchemyError

    from pneumonode.dicom.pynetdicom_internals import UnsupportedPynetdicom
    from pneumonode.inference.card import ModelPackageError
    from pneumonode.queue.migrate import SchemaError
    from pneumonode.service import serve

    def reload() -> Settings:
        return load_settings(args.config)

    try:
        return serve(settings, loader=reload)
    except ModelPackageError as exc:
        raise CliError(f"cannot load model: {exc}", EXIT_MODEL) from exc
    except SchemaError as exc:
        raise CliError(str(exc), EXIT_DATABASE) from exc
    except SQLAlchemyError as exc:
        raise CliError(database_error(settings, exc), EXIT_DATABASE) from exc
    except UnsupportedPynetdicom as exc:
        raise CliError(f"cannot start the listener: {exc}") from exc
    except OSError as exc:
        node = settings.node
        if exc.errno == errno.EADDRINUSE:
            raise CliError(
                f"port {node.port} on {node.host} is already in use (node.port)", EXIT_NETWORK
            ) from exc
        if exc.errno == errno.EACCES:
            raise CliError(
                f"not permitted to listen on {node.host}:{node.port} or to write "
                f"{node.data_dir}: {exc.strerror}",
                EXIT_NETWORK,
            ) from exc
        raise CliError(f"cannot start: {exc}", EXIT_NETWORK) from exc


def _fetch_health(settings: Settings) -> tuple[str, dict[str, Any] | None]:
    """The node's /healthz answer: (where, JSON) or (where, None) with the reason in where."""
    import urllib.error
    import urllib.request

    host = settings.metrics.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{settings.metrics.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as response:
            return url, dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        try:
            return url, dict(json.loads(exc.read()))
        except ValueError:
            return f"{url} answered HTTP {exc.code}", None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url} not reachable ({reason})", None


def cmd_status(args: argparse.Namespace) -> int:
    """The node at a glance: health from /healthz, jobs and deliveries from the database."""
    settings = settings_of(args)
    from sqlalchemy.exc import SQLAlchemyError

    report: dict[str, Any] = {}
    if settings.metrics.enabled:
        where, health = _fetch_health(settings)
        report["health_url"] = where
        report["health"] = health
    else:
        report["health_url"] = "disabled ([metrics] enabled = false)"
        report["health"] = None
    engine = engine_of(settings)
    try:
        from pneumonode.queue.reads import QueueReads

        repo = QueueReads(engine)
        report["jobs"] = repo.counts_by_state()
        report["deliveries"] = repo.delivery_counts_by_state()
        oldest = repo.oldest_unfinished_received_at()
        report["oldest_unfinished_received_at"] = oldest
        report["database"] = "ok"
    except SQLAlchemyError as exc:
        report["database"] = database_error(settings, exc)
    finally:
        engine.dispose()
    healthy = report["health"] is not None and report["health"].get("status") == "ok"
    code = EXIT_OK if healthy and report["database"] == "ok" else EXIT_FAILURE
    if args.json:
        print(json.dumps(report, default=str, indent=2))
        return code
    health = report["health"]
    if health is None:
        print(f"node:        unknown: {report['health_url']}")
    else:
        print(f"node:        {health.get('status')} ({report['health_url']})")
        for reason in health.get("reasons", []):
            print(f"             - {reason}")
        details = health.get("details", {})
        if details:
            print(
                f"             AE {details.get('ae_title')} on {details.get('dicom')}, "
                f"{details.get('workers')} workers, {details.get('senders')} senders"
            )
    if report["database"] != "ok":
        print(f"database:    {report['database']}")
        return code
    jobs, deliveries = report["jobs"], report["deliveries"]
    print("jobs:        " + "  ".join(f"{k} {v}" for k, v in jobs.items()))
    print("deliveries:  " + "  ".join(f"{k} {v}" for k, v in deliveries.items()))
    waiting = f"{jobs['received']} images waiting, {deliveries['pending']} deliveries pending"
    if oldest is not None:
        waiting += f"; oldest unfinished job received {fmt(oldest)}"
    print(f"queue:       {waiting}")
    return code


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the configuration and the model card; print the effective settings."""
    settings = settings_of(args)
    from pneumonode.inference.card import ModelCard

    try:
        card = ModelCard.load(settings.model_path)
    except (OSError, ValueError) as exc:
        raise CliError(f"model.path: {exc}", EXIT_MODEL) from exc
    print(settings.model_dump_json(indent=2))
    print(f"database: {settings.database_url}")
    print(f"model: {card.display_name} at {settings.model_path}")
    print(f"decision threshold: {card.thresholds.top:g} (probability), "
          f"minimum area {card.thresholds.min_area} px at model resolution")
    for warning in settings.warnings():
        print(f"warning: {warning}")
    print("configuration OK")
    return EXIT_OK


def _model_path(args: argparse.Namespace) -> Path:
    return Path(args.path) if args.path else settings_of(args).model_path


def cmd_model_info(args: argparse.Namespace) -> int:
    """Print a model package's card."""
    from pneumonode.inference.card import ModelCard, describe

    try:
        card = ModelCard.load(_model_path(args))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read model card: {exc}", EXIT_MODEL) from exc
    print(describe(card))
    return EXIT_OK


def cmd_model_check(args: argparse.Namespace) -> int:
    """Load a model package and run one prediction on a synthetic image."""
    import_keras(args.verbose)
    from pneumonode.inference.card import ModelPackageError
    from pneumonode.inference.predictor import Predictor

    try:
        predictor = Predictor.load(_model_path(args))
    except ModelPackageError as exc:
        raise CliError(f"cannot load model: {exc}", EXIT_MODEL) from exc
    print(predictor.check())
    return EXIT_OK
