"""One node process for the hostile suite, serving a tiny untrained model package."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import NodeProcess, free_port, write_config

from pneumonode.queue.db import make_engine
from pneumonode.queue.repository import JobRepository

#: Settings the hostile suite runs the node with (environment overrides of write_config's file).
NODE_ENV = {
    "PNEUMONODE_NODE__MAX_INSTANCE_MB": "2",
    "PNEUMONODE_NODE__MAX_ASSOCIATIONS": "6",
    "PNEUMONODE_NODE__ALLOWED_CALLING_AETS": '["HOSTILE", "VALID", "PROBE"]',
    "PNEUMONODE_DELIVERY__NETWORK_TIMEOUT_S": "3",
    "PNEUMONODE_DELIVERY__ACSE_TIMEOUT_S": "3",
    "PNEUMONODE_WORKER__MAX_ATTEMPTS": "1",
    "PNEUMONODE_WORKER__BATCH_WAIT_MS": "0",
}


def tiny_package(folder: Path) -> Path:
    """An untrained Attention U-Net package (64 x 64 input, 2 base filters): fast on a CPU."""
    import keras

    from pneumonode.inference.card import InputSpec, ModelCard, Thresholds, TrainingInfo
    from pneumonode.nets.attention_unet import build_attention_unet

    folder.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    build_attention_unet(input_shape=(64, 64, 1), base_filters=2).save(folder / "model.keras")
    ModelCard(
        name="hostile-tiny", version="0.0.1", uid="2.25.97531", variant="attention_unet",
        demo=True, input=InputSpec(size=64), thresholds=Thresholds(top=0.6, bottom=0.4),
        members=["model.keras"],
        training=TrainingInfo(recipe="test", data="untrained", epochs=0),
        intended_use="test fixture",
    ).save(folder)
    return folder


class HostileNode:
    """The running node, its data folder and its job table."""

    def __init__(self, process: NodeProcess, data_dir: Path) -> None:
        self.process = process
        self.port = process.port
        self.data_dir = data_dir
        self.repo = JobRepository(make_engine(f"sqlite:///{data_dir / 'pneumonode.db'}"))

    def alive(self) -> bool:
        assert self.process.proc is not None
        return self.process.proc.poll() is None

    def log(self) -> str:
        return self.process.log.read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="package")
def hostile_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileNode]:
    root = tmp_path_factory.mktemp("hostile-node")
    package = tiny_package(root / "package")
    data_dir = root / "data"
    config = write_config(root / "node.toml", port=free_port(), data_dir=data_dir)
    process = NodeProcess(config, root / "node.log",
                          env={**NODE_ENV, "PNEUMONODE_MODEL__PATH": str(package)}).start()
    try:
        yield HostileNode(process, data_dir)
    finally:
        process.stop()
