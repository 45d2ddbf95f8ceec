"""echo and send: DICOM to a remote AE by hand, outside the node."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pneumonode.cli.common import EXIT_FAILURE, EXIT_NETWORK, EXIT_OK, CliError


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
