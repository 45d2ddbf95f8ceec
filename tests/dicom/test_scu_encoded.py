"""Sending a file as encoded on disk when the peer takes its syntax, re-encoded when not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import synthetic
from harness import StoreSCP, free_port
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event

from pneumonode.dicom import scu
from pneumonode.dicom.encoded_store import EncodedFile
from pneumonode.dicom.scu import Remote, SendError, Timeouts, store

TIMEOUTS = Timeouts(acse=5, dimse=5, network=5)


def _files(folder: Path, count: int) -> list[Path]:
    return [
        synthetic.write(synthetic.make_radiograph(rows=32, columns=32, seed=i), folder / f"{i}.dcm")
        for i in range(count)
    ]


def _data_set_bytes(path: Path) -> bytes:
    meta = EncodedFile.read_meta(path)
    assert meta is not None
    return meta.dataset_bytes()


def test_accepted_syntax_goes_as_encoded_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _files(tmp_path / "src", 3)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

    def no_decoding(*args: Any, **kwargs: Any) -> Dataset:
        raise AssertionError("the file was decoded")

    monkeypatch.setattr(scu, "dcmread", no_decoding)
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    try:
        outcomes = store(files, "PACS", Remote("DEST", "127.0.0.1", dest.port), TIMEOUTS)
    finally:
        dest.stop()
    assert [o.ok for o in outcomes] == [True] * 3
    received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in dest.files()}
    for path, outcome in zip(files, outcomes, strict=True):
        assert outcome.sop_instance_uid == str(pydicom.dcmread(path).SOPInstanceUID)
        copy = received[outcome.sop_instance_uid]
        assert pydicom.dcmread(copy).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert _data_set_bytes(copy) == _data_set_bytes(path)


@pytest.fixture
def implicit_only_peer() -> Iterator[tuple[int, list[Dataset]]]:
    received: list[Dataset] = []

    def handle(event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="IMPLICIT")
    ae.add_supported_context(synthetic.make_radiograph(rows=8, columns=8).SOPClassUID,
                             [ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        yield port, received
    finally:
        server.shutdown()


def test_refused_syntax_is_re_encoded_in_the_accepted_one(
    tmp_path: Path, implicit_only_peer: tuple[int, list[Dataset]]
) -> None:
    port, received = implicit_only_peer
    files = _files(tmp_path / "src", 2)
    outcomes = store(files, "PACS", Remote("IMPLICIT", "127.0.0.1", port), TIMEOUTS)
    assert [o.ok for o in outcomes] == [True, True]
    assert [ds.file_meta.TransferSyntaxUID for ds in received] == [ImplicitVRLittleEndian] * 2
    for path, ds in zip(files, received, strict=True):
        original = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert ds.PixelData == original.PixelData


def test_a_file_without_file_meta_is_refused_before_associating(tmp_path: Path) -> None:
    ds = synthetic.make_radiograph(rows=8, columns=8)
    bare = tmp_path / "bare.dcm"
    pydicom.dcmwrite(bare, ds, enforce_file_format=True)
    raw = bytearray(bare.read_bytes())
    meta = EncodedFile.read_meta(bare)
    assert meta is not None
    # keep the preamble and prefix, drop every file meta element but the transfer syntax
    no_uids = Dataset()
    no_uids.TransferSyntaxUID = ExplicitVRLittleEndian
    rewritten = tmp_path / "no-uids.dcm"
    with rewritten.open("wb") as fh:
        fh.write(bytes(raw[:132]))
        pydicom.filewriter.write_file_meta_info(fh, no_uids, enforce_standard=False)
        fh.write(bytes(raw[meta.offset:]))
    with pytest.raises(SendError, match="no file meta information naming its SOP class"):
        store([rewritten], "PACS", Remote("NOBODY", "127.0.0.1", free_port()), TIMEOUTS)


def _storescp(folder: Path, *options: str) -> Any:
    """DCMTK storescp with the given transfer syntax options (none: uncompressed only)."""
    import os
    import subprocess

    from harness import PEER_ENV, port_open, require, wait_for

    folder.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen([require("storescp"), "-aet", "DEST", "-od", str(folder), *options,
                             str(port)], env={**os.environ, **PEER_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for(lambda: port_open(port), 20, "storescp to listen")
    return proc, port


@pytest.mark.parametrize(("options", "expected"), [
    (("+xa",), "1.2.840.10008.1.2.4.80"),  # takes JPEG-LS: the file goes as it is on disk
    ((), "1.2.840.10008.1.2.1"),  # uncompressed only: decompressed, the same pixels
])
def test_a_jpeg_ls_result_reaches_peers_with_and_without_the_codec(
    tmp_path: Path, options: tuple[str, ...], expected: str
) -> None:
    from pydicom.uid import JPEGLSLossless

    ds = synthetic.make_radiograph(rows=64, columns=48, seed=5)
    pixels = ds.pixel_array.copy()
    path = synthetic.write(synthetic.compress(ds, JPEGLSLossless), tmp_path / "jls.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGLSLossless
    proc, port = _storescp(tmp_path / "dest", *options)
    try:
        (outcome,) = store([path], "PACS", Remote("DEST", "127.0.0.1", port), TIMEOUTS)
    finally:
        proc.terminate()
        proc.wait(20)
    assert outcome.ok
    (received,) = [p for p in (tmp_path / "dest").iterdir() if p.is_file()]
    copy = pydicom.dcmread(received)
    assert copy.file_meta.TransferSyntaxUID == expected
    assert (copy.pixel_array == pixels).all()
    if expected == JPEGLSLossless:
        assert _data_set_bytes(received) == _data_set_bytes(path)
