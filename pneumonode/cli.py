"""Command line: serve, echo, send, jobs, config and model commands."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pneumonode import __version__
from pneumonode.settings import ConfigError, Settings, load_settings

LOGGER = logging.getLogger("pneumonode")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_NETWORK = 4


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
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node in the foreground until SIGTERM/SIGINT."""
    settings = _settings(args)
    from pneumonode.inference.package import ModelPackageError
    from pneumonode.service import serve

    try:
        return serve(settings)
    except ModelPackageError as exc:
        raise CliError(f"cannot load model: {exc}", EXIT_MODEL) from exc
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


def _repository(settings: Settings) -> Any:
    from pneumonode.queue.db import create_schema, make_engine
    from pneumonode.queue.repository import JobRepository

    engine = make_engine(settings.database_url)
    create_schema(engine)
    return JobRepository(engine)


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
    print(f"{'id':>7}  {'state':<10} {'try':>3}  {'received':<20} {'finding':<8} detail")
    for job in jobs:
        finding = "-" if job.finding_present is None else (
            "PTX" if job.finding_present else "none"
        )
        detail = job.skip_reason or job.last_error or job.sop_instance_uid
        print(
            f"{job.id:>7}  {job.state:<10} {job.attempts:>3}  {_fmt(job.received_at):<20} "
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
    from pneumonode.queue.repository import QueueError

    try:
        after = repo.retry(job.id)
    except QueueError as exc:
        raise CliError(f"job {job.id} cannot be retried in state {job.state}: {exc}") from exc
    print(f"job {after.id}: {job.state} -> {after.state}")
    return EXIT_OK


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
    print("configuration OK")
    return EXIT_OK


def _model_path(args: argparse.Namespace) -> Path:
    return Path(args.path) if args.path else _settings(args).model_path


def cmd_model_info(args: argparse.Namespace) -> int:
    """Print a model package's card."""
    from pneumonode.inference.card import ModelCard
    from pneumonode.inference.predictor import describe

    try:
        card = ModelCard.load(_model_path(args))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read model card: {exc}", EXIT_MODEL) from exc
    print(describe(card))
    return EXIT_OK


def cmd_model_check(args: argparse.Namespace) -> int:
    """Load a model package and run one prediction on a synthetic image."""
    from pneumonode.inference.package import ModelPackageError
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
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], helptext: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the node (listener, workers, senders)")

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
    _configure_logging(args.log_level)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"pneumonode: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
