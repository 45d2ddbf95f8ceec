"""Command line: serve, status, echo, send, jobs, db, config and model commands."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pneumonode import __version__
from pneumonode.dicom.log_escape import safe_handler
from pneumonode.settings import ConfigError, Settings, load_settings

LOGGER = logging.getLogger("pneumonode")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_NETWORK = 4
EXIT_DATABASE = 5

HEALTH_TIMEOUT_S = 5.0
"""How long ``pneumonode status`` waits for the node's /healthz."""


class CliError(Exception):
    """An expected failure: printed as one line, then the process exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from exc


def _configure_logging(level: str) -> None:
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


def _import_keras(verbose: bool) -> None:
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


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node in the foreground until SIGTERM/SIGINT."""
    settings = _settings(args)
    _import_keras(args.verbose)
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
        raise CliError(_database_error(settings, exc), EXIT_DATABASE) from exc
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


def _remote(args: argparse.Namespace) -> Any:
    from pneumonode.dicom.scu import Remote

    return Remote(args.aec, args.host, args.port)


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a remote AE."""
    from pneumonode.dicom.scu import SendError, echo

    try:
        status = echo(args.aet, _remote(args))
    except SendError as exc:
        raise CliError(str(exc), EXIT_NETWORK) from exc
    print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return EXIT_OK if status == 0 else EXIT_FAILURE


def _collect(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise CliError(f"no such file or folder: {path}")
    return files


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files (folders are searched recursively) to a remote AE, with a progress bar."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from tqdm import tqdm

    from pneumonode.dicom.scu import SendError, StoreOutcome, store

    files = []
    for path in _collect(args.paths):
        try:
            dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            print(f"skipping {path}: not a DICOM file ({exc})", file=sys.stderr)
            continue
        files.append(path)
    if not files:
        raise CliError("nothing to send: no DICOM files found")
    failures = 0
    with tqdm(total=len(files), unit="img", disable=args.quiet) as bar:

        def progress(outcome: StoreOutcome) -> None:
            nonlocal failures
            if not outcome.ok:
                failures += 1
                bar.write(f"{outcome.path}: status 0x{outcome.status:04X}")
            bar.update(1)

        try:
            store(files, args.aet, _remote(args), on_progress=progress)
        except SendError as exc:
            raise CliError(str(exc), EXIT_NETWORK) from exc
    print(f"sent {len(files) - failures} of {len(files)} to {args.aec}@{args.host}:{args.port}")
    return EXIT_OK if failures == 0 else EXIT_FAILURE


def _database_error(settings: Settings, exc: Exception) -> str:
    from sqlalchemy.engine import make_url

    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).strip().splitlines() or [type(exc).__name__])[0]
    return f"database {shown}: {first}"


def _engine(settings: Settings) -> Any:
    from pneumonode.queue.db import make_engine

    try:
        return make_engine(settings.database_url)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from exc


def _repository(settings: Settings) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from pneumonode.queue.admin import QueueAdmin
    from pneumonode.queue.migrate import SchemaError, prepare_schema

    engine = _engine(settings)
    try:
        prepare_schema(engine)
    except SchemaError as exc:
        raise CliError(str(exc), EXIT_DATABASE) from exc
    except SQLAlchemyError as exc:
        raise CliError(_database_error(settings, exc), EXIT_DATABASE) from exc
    return QueueAdmin(engine)


def _fmt(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """One line per job, newest first."""
    repo = _repository(_settings(args))
    jobs = repo.list_jobs(state=args.state, limit=args.limit)
    if args.json:
        print(json.dumps([dataclasses.asdict(j) for j in jobs], default=str, indent=2))
        return EXIT_OK
    print(f"{'id':>7}  {'state':<10} {'try':>3}  {'received':<25} {'finding':<8} detail")
    for job in jobs:
        finding = "-" if job.finding_present is None else (
            "PTX" if job.finding_present else "none"
        )
        detail = job.skip_reason or job.last_error or job.sop_instance_uid
        print(
            f"{job.id:>7}  {job.state:<10} {job.attempts:>3}  {_fmt(job.received_at):<25} "
            f"{finding:<8} {detail}"
        )
    counts = repo.counts_by_state()
    print("  ".join(f"{state}: {n}" for state, n in sorted(counts.items())) or "no jobs")
    return EXIT_OK


def _find(repo: Any, key: str) -> Any:
    job = repo.get_job(int(key)) if key.isdigit() else repo.find_job(key)
    if job is None:
        raise CliError(f"no job with id or SOP Instance UID {key!r}")
    return job


def cmd_jobs_show(args: argparse.Namespace) -> int:
    """Everything about one job: fields, deliveries, event history."""
    repo = _repository(_settings(args))
    job = _find(repo, args.job)
    if args.json:
        print(
            json.dumps(
                {
                    "job": dataclasses.asdict(job),
                    "deliveries": [dataclasses.asdict(d) for d in repo.deliveries(job.id)],
                    "events": [dataclasses.asdict(e) for e in repo.events(job.id)],
                },
                default=str,
                indent=2,
            )
        )
        return EXIT_OK
    for key, value in dataclasses.asdict(job).items():
        print(f"{key:>20}: {_fmt(value)}")
    print("deliveries:")
    for d in repo.deliveries(job.id):
        print(
            f"  {d.destination} ({d.ae_title}@{d.host}:{d.port}): {d.state}, "
            f"{d.attempts} attempts{', ' + d.last_error if d.last_error else ''}"
        )
    print("events:")
    for e in repo.events(job.id):
        print(f"  {_fmt(e.at)}  {e.from_state or '-':>10} -> {e.to_state:<10} {e.detail or ''}")
    return EXIT_OK


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    """Put a failed or skipped job (or its failed deliveries) back in the queue."""
    repo = _repository(_settings(args))
    job = _find(repo, args.job)
    from pneumonode.queue.records import QueueError

    try:
        after = repo.retry(job.id)
    except QueueError as exc:
        raise CliError(f"job {job.id} cannot be retried in state {job.state}: {exc}") from exc
    print(f"job {after.id}: {job.state} -> {after.state}")
    return EXIT_OK


def _since(text: str) -> datetime:
    """An ISO date or date-time; without a zone it is local time."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CliError(f"--since: {text!r} is not an ISO date or date-time ({exc})") from exc
    return moment if moment.tzinfo is not None else moment.astimezone()


def cmd_jobs_resend(args: argparse.Namespace) -> int:
    """Deliver existing results again (same UIDs) to every destination, or one (--to)."""
    settings = _settings(args)
    repo = _repository(settings)
    from pneumonode.queue.records import QueueError
    from pneumonode.results import ALL_KINDS
    from pneumonode.routing import delivery_targets, peer_ae_title

    if not (args.jobs or args.state or args.since):
        raise CliError("name the jobs to resend: job ids or UIDs, --state or --since")
    known = {d.name for d in settings.destinations}
    if args.to is not None and args.to not in known and peer_ae_title(args.to) is None:
        raise CliError(
            f"--to {args.to!r} is not a configured destination "
            f"({', '.join(sorted(known)) or 'none configured'})"
        )
    jobs = [_find(repo, key) for key in args.jobs]
    if args.state or args.since:
        since = _since(args.since) if args.since else None
        jobs += repo.list_jobs(state=args.state, limit=args.limit, since=since)
    failures = 0
    for job in {j.id: j for j in jobs}.values():
        made = tuple(k for k in ALL_KINDS if job.result_path(k) is not None)
        targets = delivery_targets(
            settings, job.calling_aet, positive=bool(job.finding_present), made=made, only=args.to
        )
        if not targets:
            print(f"job {job.id}: no destination takes its results; nothing resent")
            failures += 1
            continue
        try:
            after = repo.resend(job.id, targets)
        except QueueError as exc:
            print(f"job {job.id}: {exc}")
            failures += 1
            continue
        names = ", ".join(f"{t.destination} ({'+'.join(k.value.upper() for k in t.kinds)})"
                          for t in targets)
        print(f"job {after.id}: {job.state} -> {after.state}, resending to {names}")
    return EXIT_OK if failures == 0 else EXIT_FAILURE


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Migrate the job database to the newest schema (or print the SQL with --sql)."""
    settings = _settings(args)
    from sqlalchemy.exc import SQLAlchemyError

    from pneumonode.queue import migrate

    if args.sql:
        print(migrate.upgrade_sql(settings.database_url, args.revision), end="")
        return EXIT_OK
    engine = _engine(settings)
    try:
        result = migrate.upgrade(engine, args.revision)
    except SQLAlchemyError as exc:
        raise CliError(_database_error(settings, exc), EXIT_DATABASE) from exc
    finally:
        engine.dispose()
    if result.adopted:
        print(f"adopted an unversioned schema as revision {migrate.INITIAL_REVISION}")
    if result.before == result.after:
        print(f"database already at revision {result.after}")
    else:
        print(f"database upgraded from {result.before or '(empty)'} to {result.after}")
    return EXIT_OK


def cmd_db_current(args: argparse.Namespace) -> int:
    """Print the database's schema revision and the newest one this pneumonode has."""
    settings = _settings(args)
    from sqlalchemy.exc import SQLAlchemyError

    from pneumonode.queue import migrate

    engine = _engine(settings)
    try:
        current = migrate.current_revision(engine)
    except SQLAlchemyError as exc:
        raise CliError(_database_error(settings, exc), EXIT_DATABASE) from exc
    finally:
        engine.dispose()
    head = migrate.head_revision()
    print(f"current: {current or '(empty, never migrated)'}")
    print(f"head:    {head}")
    if current != head:
        print("run `pneumonode db upgrade` to migrate")
        return EXIT_FAILURE
    return EXIT_OK


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
    settings = _settings(args)
    from sqlalchemy.exc import SQLAlchemyError

    report: dict[str, Any] = {}
    if settings.metrics.enabled:
        where, health = _fetch_health(settings)
        report["health_url"] = where
        report["health"] = health
    else:
        report["health_url"] = "disabled ([metrics] enabled = false)"
        report["health"] = None
    engine = _engine(settings)
    try:
        from pneumonode.queue.reads import QueueReads

        repo = QueueReads(engine)
        report["jobs"] = repo.counts_by_state()
        report["deliveries"] = repo.delivery_counts_by_state()
        oldest = repo.oldest_unfinished_received_at()
        report["oldest_unfinished_received_at"] = oldest
        report["database"] = "ok"
    except SQLAlchemyError as exc:
        report["database"] = _database_error(settings, exc)
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
        waiting += f"; oldest unfinished job received {_fmt(oldest)}"
    print(f"queue:       {waiting}")
    return code


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the configuration and the model card; print the effective settings."""
    settings = _settings(args)
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
    return Path(args.path) if args.path else _settings(args).model_path


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
    _import_keras(args.verbose)
    from pneumonode.inference.card import ModelPackageError
    from pneumonode.inference.predictor import Predictor

    try:
        predictor = Predictor.load(_model_path(args))
    except ModelPackageError as exc:
        raise CliError(f"cannot load model: {exc}", EXIT_MODEL) from exc
    print(predictor.check())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pneumonode`` command."""
    parser = argparse.ArgumentParser(prog="pneumonode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pneumonode {__version__}")
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument(
        "--verbose", action="store_true", help="debug logs, TensorFlow's start-up logs included"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], helptext: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the node (listener, workers, senders)")
    status = add("status", cmd_status, "health, jobs and deliveries at a glance")
    status.add_argument("--json", action="store_true")

    def remote_args(p: argparse.ArgumentParser, host_positional: bool) -> None:
        if host_positional:
            p.add_argument("host")
            p.add_argument("port", type=int)
        else:
            p.add_argument("--host", required=True)
            p.add_argument("--port", type=int, required=True)
        p.add_argument("--aec", default="ANY-SCP", help="called AE title")
        p.add_argument("--aet", default="PNEUMONODE", help="our (calling) AE title")

    remote_args(add("echo", cmd_echo, "C-ECHO a remote AE"), host_positional=True)
    send = add("send", cmd_send, "C-STORE DICOM files or folders to a remote AE")
    send.add_argument("paths", nargs="+", type=Path)
    send.add_argument("--quiet", action="store_true", help="no progress bar")
    remote_args(send, host_positional=False)

    jobs = sub.add_parser("jobs", help="inspect and retry jobs").add_subparsers(
        dest="jobs_command", required=True
    )
    lst = add("list", cmd_jobs_list, "list jobs, newest first", jobs)
    lst.add_argument("--state", choices=[
        "received", "processing", "delivering", "done", "skipped", "failed"])
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--json", action="store_true")
    show = add("show", cmd_jobs_show, "one job with deliveries and history", jobs)
    show.add_argument("job", help="job id or SOP Instance UID")
    show.add_argument("--json", action="store_true")
    retry = add("retry", cmd_jobs_retry, "requeue a failed or skipped job", jobs)
    retry.add_argument("job", help="job id or SOP Instance UID")
    resend = add("resend", cmd_jobs_resend,
                 "deliver existing results again (same UIDs) to all destinations or one", jobs)
    resend.add_argument("jobs", nargs="*", help="job ids or SOP Instance UIDs")
    resend.add_argument("--state", choices=["done", "failed", "delivering"],
                        help="every job in this state (newest first, up to --limit)")
    resend.add_argument("--since", help="every job received since this ISO date or date-time")
    resend.add_argument("--limit", type=int, default=1000, help="most jobs --state/--since pick")
    resend.add_argument("--to", help="only this destination (default: every one that takes it)")

    db = sub.add_parser("db", help="job database schema").add_subparsers(
        dest="db_command", required=True
    )
    upgrade = add("upgrade", cmd_db_upgrade, "migrate the job database to the newest schema", db)
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    upgrade.add_argument(
        "--sql", action="store_true", help="print the SQL from an empty database; run nothing"
    )
    add("current", cmd_db_current, "print the schema revision of the job database", db)

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True
    )
    add("check", cmd_config_check, "validate the configuration and print it", config)

    model = sub.add_parser("model", help="model packages").add_subparsers(
        dest="model_command", required=True
    )
    info = add("info", cmd_model_info, "print a model package's card", model)
    info.add_argument("path", nargs="?", help="package folder (default: configured model)")
    check = add("check", cmd_model_check, "load a package and time one prediction", model)
    check.add_argument("path", nargs="?", help="package folder (default: configured model)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pneumonode`` console script."""
    args = build_parser().parse_args(argv)
    _configure_logging("DEBUG" if args.verbose else args.log_level)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except CliError as exc:
        print(f"pneumonode: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (``pneumonode jobs list | head``): not an error; stop quietly
        # and keep Python from complaining again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
