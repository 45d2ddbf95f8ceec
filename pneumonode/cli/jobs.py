"""The jobs and db commands: what an operator reads from and does to the job queue."""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import datetime
from typing import Any

from pneumonode.cli.common import (
    EXIT_DATABASE,
    EXIT_FAILURE,
    EXIT_OK,
    CliError,
    database_error,
    engine_of,
    fmt,
    settings_of,
)
from pneumonode.settings import Settings


def _repository(settings: Settings) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from pneumonode.queue.admin import QueueAdmin
    from pneumonode.queue.migrate import SchemaError, prepare_schema

    engine = engine_of(settings)
    try:
        prepare_schema(engine)
    except SchemaError as exc:
        raise CliError(str(exc), EXIT_DATABASE) from exc
    except SQLAlchemyError as exc:
        raise CliError(database_error(settings, exc), EXIT_DATABASE) from exc
    return QueueAdmin(engine)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """One line per job, newest first."""
    repo = _repository(settings_of(args))
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
            f"{job.id:>7}  {job.state:<10} {job.attempts:>3}  {fmt(job.received_at):<25} "
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
    repo = _repository(settings_of(args))
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
        print(f"{key:>20}: {fmt(value)}")
    print("deliveries:")
    for d in repo.deliveries(job.id):
        print(
            f"  {d.destination} ({d.ae_title}@{d.host}:{d.port}): {d.state}, "
            f"{d.attempts} attempts{', ' + d.last_error if d.last_error else ''}"
        )
    print("events:")
    for e in repo.events(job.id):
        print(f"  {fmt(e.at)}  {e.from_state or '-':>10} -> {e.to_state:<10} {e.detail or ''}")
    return EXIT_OK


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    """Put a failed or skipped job (or its failed deliveries) back in the queue."""
    repo = _repository(settings_of(args))
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
    settings = settings_of(args)
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
    settings = settings_of(args)
    from sqlalchemy.exc import SQLAlchemyError

    from pneumonode.queue import migrate

    if args.sql:
        print(migrate.upgrade_sql(settings.database_url, args.revision), end="")
        return EXIT_OK
    engine = engine_of(settings)
    try:
        result = migrate.upgrade(engine, args.revision)
    except SQLAlchemyError as exc:
        raise CliError(database_error(settings, exc), EXIT_DATABASE) from exc
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
    settings = settings_of(args)
    from sqlalchemy.exc import SQLAlchemyError

    from pneumonode.queue import migrate

    engine = engine_of(settings)
    try:
        current = migrate.current_revision(engine)
    except SQLAlchemyError as exc:
        raise CliError(database_error(settings, exc), EXIT_DATABASE) from exc
    finally:
        engine.dispose()
    head = migrate.head_revision()
    print(f"current: {current or '(empty, never migrated)'}")
    print(f"head:    {head}")
    if current != head:
        print("run `pneumonode db upgrade` to migrate")
        return EXIT_FAILURE
    return EXIT_OK
