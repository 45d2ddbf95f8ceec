"""Command line: serve, status, echo, send, jobs, db, config and model commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pneumonode import __version__
from pneumonode.cli.common import EXIT_OK, CliError, configure_logging
from pneumonode.cli.jobs import (
    cmd_db_current,
    cmd_db_upgrade,
    cmd_jobs_list,
    cmd_jobs_resend,
    cmd_jobs_retry,
    cmd_jobs_show,
)
from pneumonode.cli.node import (
    cmd_config_check,
    cmd_model_check,
    cmd_model_info,
    cmd_serve,
    cmd_status,
)
from pneumonode.cli.peers import cmd_echo, cmd_send


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
    configure_logging("DEBUG" if args.verbose else args.log_level)
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
