"""A model package of 3 snapshot members served end to end: storescu -> node -> storescp."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import keras
import pydicom
import pytest
import synthetic
from harness import SEG_CLASS, NodeProcess, StoreSCP, free_port, storescu, wait_for, write_config

from pneumonode.inference.card import TTA, InputSpec, ModelCard, Thresholds, TrainingInfo
from pneumonode.nets.attention_unet import build_attention_unet

pytestmark = pytest.mark.slow


def snapshot_package(folder: Path) -> ModelCard:
    folder.mkdir(parents=True)
    members = []
    for k in range(3):
        keras.utils.set_random_seed(k)
        model = build_attention_unet(input_shape=(64, 64, 1), base_filters=2)
        name = f"snapshot{k + 1}.keras"
        model.save(folder / name)
        members.append(name)
    card = ModelCard(
        name="e2e-snapshots", version="0.0.1", uid="2.25.424242", variant="attention_unet",
        demo=True, input=InputSpec(size=64), thresholds=Thresholds(top=0.6, bottom=0.4),
        tta=TTA(hflip=True), members=members,
        training=TrainingInfo(recipe="test", data="untrained snapshots", epochs=0),
        intended_use="test fixture",
    )
    card.save(folder)
    return card


def test_three_snapshot_package_end_to_end(tmp_path: Path) -> None:
    card = snapshot_package(tmp_path / "package")
    files = [synthetic.write(synthetic.make_radiograph(seed=40 + i, rows=200, columns=180),
                             tmp_path / f"{i}.dcm") for i in range(3)]
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    port = free_port()
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data",
                          destinations=[("DEST", "127.0.0.1", dest.port)])
    node = NodeProcess(config, tmp_path / "node.log",
                       env={"PNEUMONODE_MODEL__PATH": str(tmp_path / "package")}).start()
    try:
        sent = storescu(files, port)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(lambda: len(dest.files()) >= 9, 180, "9 results (SEG, SC, SR) at storescp")
        jobs = node.jobs()
    finally:
        node.stop()
        dest.stop()
    assert {j["state"] for j in jobs} == {"done"}
    assert {j["model_uid"] for j in jobs} == {card.uid}
    segs = [p for p in dest.files()
            if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == SEG_CLASS]
    assert len(segs) == 3
    for path in segs:
        seg = hd.seg.segread(path)
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName.startswith("e2e-snapshots")
        assert algorithm.AlgorithmVersion == "0.0.1"
