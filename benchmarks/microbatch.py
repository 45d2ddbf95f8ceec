"""Micro-batching: the worker inferring 8 waiting images as one batch against one at a time.

Measured side by side in one run, interleaved, on the same 8 decoded images and the same model
package (default: the bundled demo). Two levels:

* predictor: ``Predictor.analyse`` on a list of 8 images against 8 calls with one image;
* worker: 8 queued jobs run through ``Worker`` (decode, inference, SEG + overlay, job updates)
  with ``batch_size = 8`` against ``batch_size = 1``.

Usage: .venv/bin/python benchmarks/microbatch.py [--model PATH] [--rounds 5] [--size 1024]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumonode.dicom.intake import Intake
from pneumonode.dicom.pixels import decode
from pneumonode.inference.predictor import Predictor
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.repository import JobRepository
from pneumonode.settings import Settings, bundled_model_path
from pneumonode.worker import Worker

RESULTS = Path(__file__).resolve().parent / "results"
N = 8


def radiograph(seed: int, size: int) -> pydicom.Dataset:
    """A 12-bit DX chest-like image with a dark apical region (enough for timing)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = (((yy - 0.45) / 0.3) ** 2 + ((np.abs(xx - 0.5) - 0.2) / 0.14) ** 2) < 1
    image = 0.75 - 0.45 * lungs + rng.normal(0, 0.02, (size, size))
    image[(yy < 0.3) & (xx > 0.62) & (xx < 0.78)] = 0.1
    pixels = (np.clip(image, 0, 1) * 4095).astype(np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "Bench^Micro"
    ds.PatientID = "BENCH"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.2, 0.2]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelData = pixels.tobytes()
    return ds


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def bench_predictor(predictor: Predictor, datasets: list[pydicom.Dataset],
                    rounds: int) -> tuple[list[float], list[float]]:
    decoded = [decode(ds) for ds in datasets]
    images = [d.image for d in decoded]
    spacings = [d.pixel_spacing_mm for d in decoded]
    predictor.analyse(images, spacings)  # warm up both shapes
    predictor.analyse(images[:1], spacings[:1])
    batched, single = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        predictor.analyse(images, spacings)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for image, spacing in zip(images, spacings, strict=True):
            predictor.analyse([image], [spacing])
        single.append(time.perf_counter() - t0)
    return batched, single


def run_worker(predictor: Predictor, datasets: list[pydicom.Dataset], batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        settings = Settings(node={"data_dir": data_dir},
                            worker={"batch_size": batch_size, "batch_wait_ms": 0})
        engine = make_engine(f"sqlite:///{data_dir / 'jobs.db'}")
        create_schema(engine)
        repo = JobRepository(engine)
        intake = Intake(data_dir, repo)
        for ds in datasets:
            intake.receive(encoded(ds), "BENCH", None)
        worker = Worker(settings, repo, predictor, "bench:w0", threading.Event())
        t0 = time.perf_counter()
        while jobs := worker.claim_batch():
            worker.process(jobs)
        elapsed = time.perf_counter() - t0
        assert repo.counts_by_state().get("done", 0) == len(datasets)
        engine.dispose()
        return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=bundled_model_path())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024, help="source image side, pixels")
    args = parser.parse_args()
    predictor = Predictor.load(args.model)
    datasets = [radiograph(seed, args.size) for seed in range(N)]
    batched, single = bench_predictor(predictor, datasets, args.rounds)
    run_worker(predictor, datasets, N)  # warm-up of the output builders
    w_batched, w_single = [], []
    for _ in range(max(2, args.rounds // 2)):
        w_batched.append(run_worker(predictor, datasets, N))
        w_single.append(run_worker(predictor, datasets, 1))
    rows = [
        ("predictor.analyse", statistics.median(batched), statistics.median(single)),
        ("worker (decode..SEG+SC+queue)", statistics.median(w_batched),
         statistics.median(w_single)),
    ]
    card = predictor.card
    lines = [
        f"# Micro-batching: {N} waiting images, batch of {N} vs one at a time",
        "",
        f"Model: {card.display_name}, input {card.input.size} px, TTA hflip={card.tta.hflip}, "
        f"{len(card.members)} member(s). Source images {args.size}x{args.size} 12-bit DX.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average at end {os.getloadavg()[0]:.2f}; medians of {args.rounds} interleaved "
        "rounds (worker: fewer).",
        "",
        "| level | batch of 8 (s) | 8 x batch of 1 (s) | images/s batched | images/s single "
        "| speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, b, s in rows:
        lines.append(f"| {name} | {b:.3f} | {s:.3f} | {N / b:.1f} | {N / s:.1f} | {s / b:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "microbatch.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
