"""Per-image cost of each worker stage, in process: read, decode, analyse, SEG, SC, SR, write.

The stages the worker runs on one job (``pneumonode/worker.py``), each timed on its own, on
the same files, with the bundled model (or ``--model``): ``read_instance``, ``decode``,
``Predictor.analyse`` (a batch of 1, and of 4 divided by 4), ``build_segmentation``,
``build_overlay``, ``build_report``, and writing each result the worker's way
(``write_durably``: save, fsync, rename, fsync the folder). SEG and SC are also built for a
positive finding (a disc on the image), since a negative image skips the drawing. Sources: the
SIIM sample images (1024 px, JPEG Baseline) and a synthetic 2048 px 12-bit DX, uncompressed and
JPEG 2000 lossless. Medians of ``--rounds`` rounds; the first pass is a warm-up. Output sizes
are reported beside.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from _common import (
    SIIM_DICOM,
    BenchmarkError,
    Table,
    command_line,
    machine_info,
    make_dx,
    median,
    run_main,
    say,
    write_results,
)


@dataclass
class Source:
    """A named group of files measured together."""

    name: str
    files: list[Path]


STAGES = (
    "read_instance",
    "decode",
    "analyse, batch 1",
    "analyse, batch 4 (per image)",
    "build_segmentation",
    "build_overlay",
    "build_report",
    "build_segmentation (positive)",
    "build_overlay (positive)",
    "build_overlay (JPEG-LS)",
    "write SEG",
    "write SC",
    "write SC (JPEG-LS)",
    "write SR",
)


def synthetic_sources(folder: Path, size: int) -> list[Source]:
    """A synthetic DX of ``size`` px, 12 bits in 16, uncompressed and JPEG 2000 lossless."""
    from pydicom.uid import JPEG2000Lossless

    native, j2k = [], []
    for seed in range(2):
        ds = make_dx(seed, size)
        path = folder / f"dx{seed}-native.dcm"
        ds.save_as(path, enforce_file_format=True)
        native.append(path)
        ds.compress(JPEG2000Lossless)
        path = folder / f"dx{seed}-j2k.dcm"
        ds.save_as(path, enforce_file_format=True)
        j2k.append(path)
    return [
        Source(f"DX {size} px 16-bit native", native),
        Source(f"DX {size} px 16-bit J2K lossless", j2k),
    ]


def positive_finding(shape: tuple[int, int], spacing: tuple[float, float] | None) -> Any:
    """A finding with a disc in the right upper zone, as a positive image would have."""
    import cv2
    import numpy as np

    from pneumonode.findings import Finding

    rows, columns = shape
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.circle(mask, (columns // 3, rows // 3), max(2, min(shape) // 8), 1, -1)
    boolean = mask.astype(bool)
    area = None if spacing is None else float(boolean.sum()) * spacing[0] * spacing[1]
    return Finding(mask=boolean, present=True, score=0.9, area_mm2=area)


def measure(source: Source, predictor: Any, rounds: int, folder: Path
            ) -> tuple[dict[str, list[float]], dict[str, list[int]], str]:
    """Time every stage on every file of ``source``; ms lists per stage and byte sizes."""
    from pydicom.uid import JPEGLSLossless, generate_uid

    from pneumonode.datafolder import PARTIAL_SUFFIX, make_folder, write_durably
    from pneumonode.dicom.instance import read_instance
    from pneumonode.dicom.pixels import decode
    from pneumonode.outputs.overlay import build_overlay
    from pneumonode.outputs.seg import build_segmentation
    from pneumonode.outputs.sr import build_report

    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    sizes: dict[str, list[int]] = {"source": [], "SEG": [], "SC": [], "SR": [],
                                   "SC (positive)": [], "SC (JPEG-LS)": []}
    card = predictor.card
    syntax = ""
    # an older checkout (measured for a before/after table) has no JPEG-LS overlay: n/a
    jpeg_ls = "transfer_syntax_uid" in inspect.signature(build_overlay).parameters

    def timed(stage: str, count: bool, call: Callable[..., Any], *args: Any, per: int = 1,
              **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = call(*args, **kwargs)
        if count:
            times[stage].append(1000.0 * (time.perf_counter() - start) / per)
        return result

    def write(path: Path, ds: Any) -> int:
        make_folder(path.parent)  # the job's result folder, made by its first result
        write_durably(path, partial(ds.save_as, enforce_file_format=True),
                      path.with_name(path.name + PARTIAL_SUFFIX))
        return path.stat().st_size

    for round_ in range(rounds + 1):
        count = round_ > 0  # round 0 warms up codecs, the model and highdicom
        for index, path in enumerate(source.files):
            ds = timed("read_instance", count, read_instance, path)
            syntax = syntax or ds.file_meta.TransferSyntaxUID.keyword
            image = timed("decode", count, decode, ds)
            (finding,) = timed("analyse, batch 1", count, predictor.analyse,
                               [image.image], [image.pixel_spacing_mm])
            timed("analyse, batch 4 (per image)", count, predictor.analyse,
                  [image.image] * 4, [image.pixel_spacing_mm] * 4, per=4)
            uids = {k: str(generate_uid()) for k in ("seg", "segs", "sc", "scs", "sr", "srs")}
            seg_uids = {"series_instance_uid": uids["segs"], "sop_instance_uid": uids["seg"]}
            sc_uids = {"series_instance_uid": uids["scs"], "sop_instance_uid": uids["sc"]}
            seg = timed("build_segmentation", count, build_segmentation, ds, finding, card,
                        **seg_uids)
            sc = timed("build_overlay", count, build_overlay, ds, image, finding, card, **sc_uids)
            sr = timed("build_report", count, build_report, ds, finding, card, seg,
                       series_instance_uid=uids["srs"], sop_instance_uid=uids["sr"])
            positive = positive_finding(image.image.shape, image.pixel_spacing_mm)
            timed("build_segmentation (positive)", count, build_segmentation, ds, positive, card,
                  **seg_uids)
            sc_positive = timed("build_overlay (positive)", count, build_overlay, ds, image,
                                positive, card, **sc_uids)
            out = folder / f"r{round_}-{index}"
            if jpeg_ls:
                sc_jls = timed("build_overlay (JPEG-LS)", count, build_overlay, ds, image,
                               finding, card, transfer_syntax_uid=JPEGLSLossless, **sc_uids)
                jls_size = timed("write SC (JPEG-LS)", count, write, out / "overlay-jls.dcm",
                                 sc_jls)
                if round_ == 1:
                    sizes["SC (JPEG-LS)"].append(jls_size)
            seg_size = timed("write SEG", count, write, out / "seg.dcm", seg)
            sc_size = timed("write SC", count, write, out / "overlay.dcm", sc)
            sr_size = timed("write SR", count, write, out / "sr.dcm", sr)
            if round_ == 1:
                sizes["source"].append(path.stat().st_size)
                sizes["SEG"].append(seg_size)
                sizes["SC"].append(sc_size)
                sizes["SR"].append(sr_size)
                sizes["SC (positive)"].append(write(out / "overlay-positive.dcm", sc_positive))
    return times, sizes, syntax


def _median(values: list[float] | list[int]) -> float:
    """The median, or NaN (shown "n/a") for a stage the measured code does not have."""
    return median(values) if values else math.nan


def main(argv: list[str] | None = None) -> int:
    """Run the stage benchmark; print the tables and write ``results/stages.md``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model package (default: the bundled demo)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--siim-count", type=int, default=10,
                        help="SIIM sample images (default 10, all)")
    parser.add_argument("--dx-size", type=int, default=2048,
                        help="side of the synthetic DX (default 2048; 0 leaves it out)")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; do not write results/stages.md")
    args = parser.parse_args(argv)
    info = machine_info()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from pneumonode.inference.predictor import Predictor
    from pneumonode.settings import Settings

    predictor = Predictor.load(args.model if args.model else Settings().model_path)
    with tempfile.TemporaryDirectory(prefix="pneumonode-stages-") as tmp:
        folder = Path(tmp)
        sources: list[Source] = []
        siim = sorted(SIIM_DICOM.glob("*.dcm"))[: args.siim_count] if SIIM_DICOM.is_dir() else []
        if siim:
            sources.append(Source("SIIM 1024 px", siim))
        else:
            say(f"SIIM sample images skipped: {SIIM_DICOM.resolve()} is absent")
        if args.dx_size:
            sources += synthetic_sources(folder, args.dx_size)
        if not sources:
            raise BenchmarkError("no source images")
        results = []
        for source in sources:
            say(f"measuring {source.name} ({len(source.files)} files, {args.rounds} rounds)")
            results.append((source, *measure(source, predictor, args.rounds, folder / "out")))

    headers = ["stage"] + [f"{s.name} ({syntax})" for s, _, _, syntax in results]
    table = Table("Per-image stage times, ms (median over files x rounds)", headers)
    for stage in STAGES:
        table.add(stage, *(_median(times[stage]) for _, times, _, _ in results))
    worker = ("read_instance", "decode", "analyse, batch 1", "build_segmentation",
              "build_overlay", "build_report", "write SEG", "write SC", "write SR")
    table.add("**sum (worker, batch 1, SC uncompressed)**",
              *(sum(median(times[s]) for s in worker) for _, times, _, _ in results))
    table.note = (f"{args.rounds} timed rounds after one warm-up round; each file once per "
                  "round. `(positive)`: the same image with a disc-shaped finding (the demo "
                  "model finds little on real images). Writes are the worker's: save, fsync, "
                  "rename, fsync the folder.")
    size_table = Table("Output sizes, kB (median)", ["object", *headers[1:]])
    for key in ("source", "SEG", "SC", "SC (positive)", "SC (JPEG-LS)", "SR"):
        size_table.add(key, *(_median(sizes[key]) / 1000.0 for _, _, sizes, _ in results))
    for block in (table, size_table):
        say(block.markdown())
        say()
    if not args.no_write:
        path = write_results("stages", "Worker stages, per image", command_line(), info,
                             [table.markdown(), size_table.markdown()])
        say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
