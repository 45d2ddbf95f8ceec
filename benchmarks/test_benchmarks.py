"""The benchmark scripts run and their helpers compute what they claim (tiny, fast settings)."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    """The helper modules, imported from the benchmarks folder."""
    monkeypatch.syspath_prepend(str(BENCH))
    return {name: importlib.import_module(name) for name in ("_common", "_profile")}


def run_script(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run a benchmark script with results sent to ``tmp_path`` (never the committed ones)."""
    env = {**os.environ, "PNEUMONODE_BENCH_RESULTS": str(tmp_path / "results")}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def test_percentile_and_median(bench: dict[str, ModuleType]) -> None:
    common = bench["_common"]
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert common.median(values) == 3.0
    assert common.percentile(values, 95) == pytest.approx(4.8)
    assert common.percentile(values, 0) == 1.0
    assert common.percentile([7.0], 95) == 7.0


def test_table_markdown_escapes_and_formats(bench: dict[str, ModuleType]) -> None:
    table = bench["_common"].Table("T", ["a", "b"])
    table.add("x|y", 1234.5678)
    table.add("z", 0.012345)
    text = table.markdown()
    assert "| x\\|y | 1235 |" in text
    assert "| z | 0.0123 |" in text


def test_results_go_to_the_override_folder(
    bench: dict[str, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = bench["_common"]
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    common.write_results("sending", "Sending", "cmd", {"nproc": "2"}, ["body-s"])
    common.write_results("ingest", "Ingest", "cmd", {"nproc": "2"}, ["body-i"])
    collected = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    assert collected.index("## Ingest") < collected.index("## Sending")
    assert "- nproc: 2" in (tmp_path / "ingest.md").read_text(encoding="utf-8")


def test_profile_parse_and_categories(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    profile = bench["_profile"]
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "thread (0x1): AcceptorThread@1;run (/x/assoc.py:10);handle_store (/x/scp.py:5);"
        "Intake._write_durably (/x/intake.py:185) 30\n"
        "thread (0x1): AcceptorThread@1;run (/x/assoc.py:10);sleep_loop (/x/assoc.py:20) 10\n"
        "thread (0x2): Thread-3 (run_reactor);run_reactor (/x/dul.py:3) 60\n",
        encoding="utf-8",
    )
    samples = profile.parse(raw)
    assert profile.total(samples) == 100
    assert profile.threads_with(samples, "handle_store") == {"0x1"}
    rules = [("durable write", lambda s: s.has("_write_durably")), ("rest", lambda s: True)]
    table = profile.categories_table(
        [s for s in samples if s.tid == "0x1"], rules, "t", rate=100, per=10, per_label="image"
    )
    assert table.rows[0][:3] == ["durable write", "30", "75.0%"]
    assert table.rows[0][3] == "30.0"  # 30 samples at 100 Hz over 10 images = 30 ms each
    assert table.rows[1][0] == "rest"


def test_synthetic_dx_is_a_valid_unique_image(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    import pydicom

    paths = bench["_common"].write_dx_set(tmp_path, 2, size=64)
    first, second = (pydicom.dcmread(p) for p in paths)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.pixel_array.shape == (64, 64)
    assert first.pixel_array.max() > first.pixel_array.min()


@pytest.mark.slow
def test_gpu_inference_smoke_runs(tmp_path: Path) -> None:
    out = run_script(tmp_path, "benchmarks/gpu_inference.py", "--smoke")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| float32 | 32 | 1 |" in out.stdout
    assert "| mixed_bfloat16 | 32 | 2 |" in out.stdout
    assert "failed" not in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    not (REPO / "pneumonode" / "models" / "demo" / "model_card.json").is_file(),
    reason="the bundled demo model package is absent",
)
def test_inference_smoke_runs(tmp_path: Path) -> None:
    out = run_script(tmp_path, "benchmarks/inference.py", "--smoke")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| mixed_bfloat16 | 2 |" in out.stdout
    assert "max abs probability difference" in out.stdout


@pytest.mark.skipif(shutil.which("storescu") is None or shutil.which("storescp") is None,
                    reason="DCMTK not installed (Debian package dcmtk)")
def test_sending_small_run_writes_its_table(tmp_path: Path) -> None:
    out = run_script(tmp_path, "benchmarks/sending.py", "--count", "5", "--rounds", "1",
                     "--no-profile")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = (tmp_path / "results" / "sending.md").read_text(encoding="utf-8")
    assert "| pneumonode / storescu |" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("storescu") is None or shutil.which("storescp") is None,
                    reason="DCMTK not installed (Debian package dcmtk)")
def test_ingest_small_run_stores_every_image(tmp_path: Path) -> None:
    out = run_script(tmp_path, "benchmarks/ingest.py", "--count", "5", "--rounds", "1",
                     "--receivers", "pneumonode,storescp", "--no-profile")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = (tmp_path / "results" / "ingest.md").read_text(encoding="utf-8")
    assert "| pneumonode / storescp |" in text


def test_pipeline_reports_scaling_not_available_for_an_unknown_setting(
    bench: dict[str, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = importlib.import_module("pipeline")
    monkeypatch.setattr(pipeline, "PROCESSES_ENV", "PNEUMONODE_WORKER__NO_SUCH_SETTING")
    ok, why, default = pipeline.processes_support(tmp_path)
    assert (ok, default) == (False, None)
    assert "no_such_setting" in why.lower()


def test_pipeline_ratios_and_the_not_available_row(bench: dict[str, ModuleType]) -> None:
    pipeline = importlib.import_module("pipeline")
    configs = pipeline.pipeline_configs([], None, orthanc=True)
    assert [c.key for c in configs] == ["orthanc", "ingest", "pipeline"]
    runs = {
        "orthanc": [pipeline.Measured(1.0), pipeline.Measured(2.0), pipeline.Measured(1.0)],
        "ingest": [pipeline.Measured(2.0)],
        "pipeline": [pipeline.Measured(0.5, 10.0, {"done": 10})],
    }
    table, ratios, rate = pipeline.rates_tables(configs, runs, 10, "no worker.processes")
    assert rate["orthanc:store"] == 10.0  # median 1 s for 10 images
    assert rate["pipeline:pipeline"] == 1.0
    rows = {row[0]: row[1:] for row in ratios.rows}
    assert rows["pipeline / Orthanc store-only"] == ["0.1", ">= 0.15", "NO"]
    assert rows["ingest with the worker running / Orthanc"] == ["2", ">= 1", "yes"]
    assert rows["2 processes / 1 process (pipeline)"][0] == "not available"
    assert "first byte sent -> last result arrived" in table.markdown()


def test_pipeline_configs_measure_the_default_process_count_once(
    bench: dict[str, ModuleType],
) -> None:
    pipeline = importlib.import_module("pipeline")
    configs = pipeline.pipeline_configs([1, 2], 1, orthanc=False, ingest=False)
    assert [c.key for c in configs] == ["processes=1", "processes=2"]
    assert "(the default)" in configs[0].label
    assert configs[1].env == {pipeline.PROCESSES_ENV: "2"}


def test_sink_scp_writes_each_received_instance(
    bench: dict[str, ModuleType], tmp_path: Path
) -> None:
    common = bench["_common"]
    pipeline = importlib.import_module("pipeline")
    files = common.write_dx_set(tmp_path / "in", 2, size=32)
    sink = common.SinkSCP(tmp_path / "sink", common.free_port())
    with common.running(sink):
        sent = pipeline.send_pynetdicom(files, sink.port, sink.ae_title)
        common.wait_for(lambda: len(sink.files()) == 2, 30, "two files at the sink")
    assert sent.seconds > 0
    assert all(p.stat().st_size > 32 * 32 * 2 for p in sink.files())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("storescu") is None or shutil.which("storescp") is None,
                    reason="DCMTK not installed (Debian package dcmtk)")
def test_pipeline_small_run_writes_its_table(tmp_path: Path) -> None:
    out = run_script(tmp_path, "benchmarks/pipeline.py", "--count", "3", "--rounds", "1",
                     "--synthetic", "256", "--no-orthanc", "--processes", "", "--warmup", "1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = (tmp_path / "results" / "pipeline.md").read_text(encoding="utf-8")
    assert "| pneumonode, defaults | first byte sent -> last result arrived |" in text
    assert "| ingest with the worker running / worker off |" in text
