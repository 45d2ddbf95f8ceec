"""End to end with real peers: DCMTK storescu -> pneumonode -> DCMTK storescp."""

from __future__ import annotations

import statistics
from datetime import datetime
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import synthetic
from harness import (
    SC_CLASS,
    SEG_CLASS,
    SIIM_DICOM,
    SR_CLASS,
    NodeProcess,
    StoreSCP,
    dciodvfy_errors,
    free_port,
    storescu,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


def siim_files() -> list[Path]:
    if not SIIM_DICOM.is_dir():
        pytest.skip(f"SIIM sample images not found at {SIIM_DICOM} (the shared test data)")
    files = sorted(SIIM_DICOM.glob("*.dcm"))
    assert len(files) == 10
    return files


def synthetic_files(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        synthetic.write(synthetic.make_radiograph(seed=seed + i, rows=256, columns=240),
                        folder / f"img{i}.dcm")
        for i in range(n)
    ]


def by_class(files: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {SEG_CLASS: [], SC_CLASS: [], SR_CLASS: []}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.setdefault(str(ds.SOPClassUID), []).append(path)
    return out


def test_storescu_to_node_to_storescp(tmp_path: Path) -> None:
    sources = siim_files()
    dx = synthetic.make_dx_monochrome1_16bit(seed=7)
    sources.append(synthetic.write(dx, tmp_path / "dx-mono1-16bit.dcm"))
    headers = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sources)
    }
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    port = free_port()
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data",
                          destinations=[("DEST", "127.0.0.1", dest.port)])
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        sent = storescu(sources, port)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(lambda: len(dest.files()) >= 3 * len(sources), 300,
                 f"{3 * len(sources)} result objects (SEG, SC, SR) at storescp")
        jobs = node.jobs()
    finally:
        assert node.stop() == 0, node.tail()
        dest.stop()

    assert {j["state"] for j in jobs} == {"done"}, jobs
    assert {j["sop_instance_uid"] for j in jobs} == set(headers)
    received = by_class(dest.files())
    assert len(received[SEG_CLASS]) == len(sources)
    assert len(received[SC_CLASS]) == len(sources)
    assert len(received[SR_CLASS]) == len(sources)

    referenced = set()
    arrival: dict[str, float] = {}
    for path in received[SEG_CLASS]:
        seg = hd.seg.segread(path)
        refs = [
            inst.ReferencedSOPInstanceUID
            for series in seg.ReferencedSeriesSequence
            for inst in series.ReferencedInstanceSequence
        ]
        assert len(refs) == 1
        source = headers[refs[0]]
        referenced.add(refs[0])
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
        assert seg.SeriesInstanceUID != source.SeriesInstanceUID
        arrival[refs[0]] = path.stat().st_mtime
    assert referenced == set(headers)
    assert sorted(pydicom.dcmread(p).StudyInstanceUID for p in received[SC_CLASS]) == sorted(
        h.StudyInstanceUID for h in headers.values()
    )
    seg_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in received[SEG_CLASS]}
    for path in received[SR_CLASS]:
        report = pydicom.dcmread(path)
        evidence = {
            str(instance.ReferencedSOPInstanceUID)
            for study in report.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for instance in series.ReferencedSOPSequence
        }
        assert evidence & set(headers) and evidence & seg_uids, evidence
        assert report.StudyInstanceUID in {h.StudyInstanceUID for h in headers.values()}
    for path in received[SEG_CLASS] + received[SC_CLASS] + received[SR_CLASS]:
        errors, text = dciodvfy_errors(path)
        assert errors == [], f"{path.name}:\n{text}"
    for path in received[SC_CLASS]:
        overlay = hd.imread(path)
        assert overlay.SamplesPerPixel == 3
        assert "NOT FOR DIAGNOSTIC USE" in str(overlay.SeriesDescription).upper()

    latencies = []
    for job in jobs:
        if job["sop_instance_uid"] in arrival and str(job["sop_instance_uid"]).startswith(
            "1.2.276.0.7230010"
        ):
            stored = datetime.fromisoformat(str(job["received_at"])).timestamp()
            latencies.append(arrival[str(job["sop_instance_uid"])] - stored)
    assert len(latencies) == 10
    median = statistics.median(latencies)
    print(f"\nC-STORE end -> SEG at destination, 10 SIIM images: median {median:.2f} s, "
          f"max {max(latencies):.2f} s")


def test_acknowledged_images_survive_sigkill(tmp_path: Path) -> None:
    files = synthetic_files(tmp_path / "in", 6)
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    port = free_port()
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data",
                          destinations=[("DEST", "127.0.0.1", dest.port)])
    receiving_only = NodeProcess(config, tmp_path / "node.log",
                                 env={"PNEUMONODE_WORKER__ENABLED": "false"}).start()
    try:
        sent = storescu(files, port)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        receiving_only.kill()
        assert dest.files() == []
        node = NodeProcess(config, tmp_path / "node.log").start()
        try:
            wait_for(lambda: len(dest.files()) >= 18, 240, "results of the 6 acknowledged images")
            jobs = node.jobs()
        finally:
            node.stop()
    finally:
        dest.stop()
    assert len(jobs) == 6
    assert {j["state"] for j in jobs} == {"done"}
    received = by_class(dest.files())
    assert len(received[SEG_CLASS]) == 6 and len(received[SC_CLASS]) == 6
    assert len(received[SR_CLASS]) == 6


def test_destination_down_at_first_gets_everything_later(tmp_path: Path) -> None:
    files = synthetic_files(tmp_path / "in", 3, seed=20)
    dest = StoreSCP(tmp_path / "dest", free_port())
    port = free_port()
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data",
                          destinations=[("DEST", "127.0.0.1", dest.port)])
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        sent = storescu(files, port)
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def failed_once() -> bool:
            show = node.cli("jobs", "show", "1", "--json")
            return show.returncode == 0 and '"last_error": "cannot associate' in show.stdout

        wait_for(failed_once, 180, "a failed delivery attempt while the destination is down")
        assert {j["state"] for j in node.jobs()} <= {"processing", "received", "delivering"}
        dest.start()
        wait_for(lambda: len(dest.files()) >= 9, 120, "results after the destination came up")
        wait_for(lambda: {j["state"] for j in node.jobs()} == {"done"}, 30, "all jobs done")
        assert len(dest.files()) == 9  # SEG, SC and SR of each of the 3 images
    finally:
        node.stop()
        dest.stop()
