"""docs/conformance.md agrees with the code: every list the code decides is read from both sides.

The statement's checked tables follow a ``<!-- conformance-table: NAME -->`` line; each one is
compared here with what the node actually negotiates, answers, creates or reads from its settings,
so that a change to the code which is not carried into the statement fails.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import re
import ssl
import tomllib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any, get_args

import pydicom
import pynetdicom
import pytest
import synthetic
from pydantic import BaseModel
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.decoders.pylibjpeg import DECODER_DEPENDENCIES
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pynetdicom import AE

import pneumonode.outputs.codes as output_codes
from pneumonode.dicom import scu
from pneumonode.dicom.intake import Status
from pneumonode.dicom.pixels import decode
from pneumonode.dicom.scp import (
    ACCEPTED_SOP_CLASSES,
    VERIFICATION,
    build_ae,
    decodable_transfer_syntaxes,
)
from pneumonode.dicom.tls import BCP195_CIPHERS, _base
from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.overlay import build_overlay
from pneumonode.outputs.seg import build_segmentation
from pneumonode.outputs.sr import build_report
from pneumonode.settings import Settings, bundled_model_path

REPO_ROOT = Path(__file__).resolve().parents[1]
STATEMENT = REPO_ROOT / "docs" / "conformance.md"
CREATED = datetime.datetime(2024, 5, 6, 7, 8, 9)
#: Settings key in the statement: ``section.key``, or ``section[].key`` for a list of tables.
SETTING = re.compile(r"^([a-z_]+)(\[\])?\.([a-z_]+)$")
REQUIRED = object()


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table(name: str) -> list[dict[str, str]]:
    """The rows of the statement's table ``name``, as {header: cell}, backticks removed."""
    lines = STATEMENT.read_text(encoding="utf-8").splitlines()
    marker = f"<!-- conformance-table: {name} -->"
    found = [i for i, line in enumerate(lines) if line.strip() == marker]
    assert len(found) == 1, f"{STATEMENT.name}: {len(found)} tables named {name!r}, expected 1"
    header = _cells(lines[found[0] + 1])
    assert set(lines[found[0] + 2].replace("|", "").split()) == {"---"}, f"{name}: no separator"
    rows = []
    for line in lines[found[0] + 3 :]:
        if not line.startswith("|"):
            break
        cells = [c.replace("`", "") for c in _cells(line)]
        assert len(cells) == len(header), f"{name}: row {line!r} has {len(cells)} cells"
        rows.append(dict(zip(header, cells, strict=True)))
    assert rows, f"table {name!r} is empty"
    return rows


def column(name: str, header: str) -> list[str]:
    """One column of the statement's table ``name``."""
    return [row[header] for row in table(name)]


@pytest.fixture
def default_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with nothing from the environment: the defaults the statement documents."""
    for key in [k for k in os.environ if k.startswith("PNEUMONODE_")]:
        monkeypatch.delenv(key)
    return Settings()


def _contexts(ae: AE) -> dict[str, list[str]]:
    return {
        str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax]
        for cx in ae.supported_contexts
    }


# (a) SOP classes as SCP -------------------------------------------------------------------------


def test_scp_sop_classes_are_those_the_listener_accepts(default_settings: Settings) -> None:
    rows = table("scp-sop-classes")
    stated = {row["SOP Class UID"]: row for row in rows}
    assert len(stated) == len(rows), "a SOP class is listed twice"
    assert set(stated) == set(ACCEPTED_SOP_CLASSES) | {VERIFICATION}
    assert set(stated) == set(_contexts(build_ae(default_settings)))
    for uid, name in ACCEPTED_SOP_CLASSES.items():
        assert stated[uid]["SOP Class"] == name
    assert {row["Role"] for row in rows} == {"SCP"}


def test_overview_lists_the_same_services() -> None:
    rows = table("network-services")
    scp = {row["SOP Class UID"] for row in rows if row["Provider of Service (SCP)"] == "Yes"}
    scu_ = {row["SOP Class UID"] for row in rows if row["User of Service (SCU)"] == "Yes"}
    assert scp == set(column("scp-sop-classes", "SOP Class UID"))
    assert scu_ == set(column("scu-sop-classes", "SOP Class UID"))
    assert scp | scu_ == {row["SOP Class UID"] for row in rows}


# (b) transfer syntaxes accepted -----------------------------------------------------------------


def _declared_dependencies() -> set[str]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    names = set()
    for requirement in pyproject["project"]["dependencies"]:
        match = re.match(r"[A-Za-z0-9_.-]+", requirement)
        assert match is not None
        names.add(match.group(0).lower())
    return names


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_storage_transfer_syntaxes_are_those_the_installed_decoders_read(
    default_settings: Settings,
) -> None:
    """The accepted list is computed from the installed pydicom decoders.

    Rows whose decoder is ``pydicom`` are always accepted. Rows decoded by a pylibjpeg plugin
    must name the plugin pydicom needs for that syntax, and that plugin must be a declared
    dependency; they are required to be accepted when the plugin is installed (always, with the
    declared dependencies) and are left out of the comparison only when it is not (an install
    that dropped it, where another plugin may or may not decode them). Nothing may be accepted
    that the statement does not list, whatever is installed.
    """
    rows = table("scp-storage-transfer-syntaxes")
    stated = [row["Transfer Syntax UID"] for row in rows]
    assert len(set(stated)) == len(stated), "a transfer syntax is listed twice"
    declared = _declared_dependencies()
    required: set[str] = set()
    for row in rows:
        uid = pydicom.uid.UID(row["Transfer Syntax UID"])
        packages = [p.strip() for p in row["Decoder (declared dependency)"].split("+")]
        if packages == ["pydicom"]:
            decoder = get_decoder(uid)
            assert decoder.is_native or "pydicom" in decoder.available_plugins, uid.name
            required.add(str(uid))
            continue
        pydicom_needs = {re.split(r"[<>=]", d)[0] for d in DECODER_DEPENDENCIES[uid]}
        assert set(packages) == pydicom_needs, f"{uid.name}: pydicom needs {pydicom_needs}"
        assert set(packages) <= declared, f"{uid.name}: {packages} not all declared"
        if all(_installed(p) for p in packages):
            required.add(str(uid))
    accepted = decodable_transfer_syntaxes()
    assert set(accepted) - set(stated) == set(), "accepted but not in the statement"
    assert required - set(accepted) == set(), "in the statement but not accepted"
    assert stated[:4] == accepted[:4], "the uncompressed preference order differs"
    listener = _contexts(build_ae(default_settings))
    for sop_class in ACCEPTED_SOP_CLASSES:
        assert set(listener[sop_class]) == set(accepted)


def test_verification_transfer_syntaxes_accepted(default_settings: Settings) -> None:
    stated = column("scp-verification-transfer-syntaxes", "Transfer Syntax UID")
    assert set(column("scp-verification-transfer-syntaxes", "Abstract Syntax UID")) == {
        VERIFICATION
    }
    assert set(stated) == set(_contexts(build_ae(default_settings))[VERIFICATION])


# (c) SOP classes as SCU -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """SEG, SC and SR made from a synthetic radiograph and written as the worker writes them."""
    folder = tmp_path_factory.mktemp("results")
    source = pydicom.dcmread(
        synthetic.write(synthetic.make_radiograph(rows=128, columns=128), folder / "src.dcm")
    )
    image = decode(source)
    mask = synthetic.lesion_mask(source.Rows, source.Columns)
    spacing = image.pixel_spacing_mm
    assert spacing is not None
    finding = Finding(
        mask=mask, present=True, score=0.9, area_mm2=float(mask.sum() * spacing[0] * spacing[1])
    )
    card = ModelCard.load(bundled_model_path())
    seg = build_segmentation(
        source, finding, card, series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(), created=CREATED,
    )  # fmt: skip
    sc = build_overlay(
        source, image, finding, card, series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(), created=CREATED,
    )  # fmt: skip
    sr = build_report(
        source, finding, card, seg, series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(), created=CREATED,
    )  # fmt: skip
    paths = []
    for name, dataset in (("seg", seg), ("sc", sc), ("sr", sr)):
        path = folder / f"{name}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _classes(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths}


def test_scu_sop_classes_are_the_objects_the_node_makes(result_files: list[Path]) -> None:
    rows = table("scu-sop-classes")
    assert {row["SOP Class UID"] for row in rows} == _classes(result_files) | {VERIFICATION}
    assert {row["Role"] for row in rows} == {"SCU"}
    assert set(column("scu-result-contexts", "Abstract Syntax UID")) == _classes(result_files)


# (d) transfer syntaxes proposed -----------------------------------------------------------------


Proposal = tuple[dict[str, list[str]], int]


@pytest.fixture
def proposed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Proposal]]:
    """What scu.py requests: each association attempt's contexts ({abstract syntax: transfer
    syntaxes}) and the maximum PDU length it advertises; the attempt is then refused."""
    seen: list[Proposal] = []

    def capture(ae: AE, remote: scu.Remote, tls: ssl.SSLContext | None) -> Any:
        contexts: dict[str, list[str]] = {}
        for cx in ae.requested_contexts:
            assert str(cx.abstract_syntax) not in contexts, "one context per SOP class"
            contexts[str(cx.abstract_syntax)] = [str(ts) for ts in cx.transfer_syntax]
        seen.append((contexts, ae.maximum_pdu_size))
        raise scu.SendError("captured; no association made")

    monkeypatch.setattr(scu, "_associate", capture)
    yield seen


def test_transfer_syntaxes_proposed_for_results(
    result_files: list[Path], proposed: list[Proposal]
) -> None:
    with pytest.raises(scu.SendError, match="captured"):
        scu.store(result_files, "PNEUMONODE", scu.Remote("PACS", "127.0.0.1", 104))
    ((contexts, _),) = proposed
    assert set(contexts) == _classes(result_files)
    stated = column("scu-result-transfer-syntaxes", "Transfer Syntax UID")
    for sop_class, syntaxes in contexts.items():
        assert syntaxes == stated, sop_class


def test_transfer_syntaxes_proposed_for_echo(proposed: list[Proposal]) -> None:
    with pytest.raises(scu.SendError, match="captured"):
        scu.echo("PNEUMONODE", scu.Remote("ANY-SCP", "127.0.0.1", 104))
    ((contexts, _),) = proposed
    assert set(column("scu-verification-transfer-syntaxes", "Abstract Syntax UID")) == {
        VERIFICATION
    }
    assert contexts == {
        VERIFICATION: column("scu-verification-transfer-syntaxes", "Transfer Syntax UID")
    }


def test_association_parameters(default_settings: Settings, proposed: list[Proposal]) -> None:
    rows = {row["Parameter"]: row["Value"] for row in table("association-parameters")}
    as_acceptor = rows["Maximum PDU length received, as acceptor (the listener)"]
    assert "node.max_pdu_length" in as_acceptor
    stated_default = int(re.findall(r"default (\d+) bytes", as_acceptor)[0])
    assert build_ae(default_settings).maximum_pdu_size == stated_default
    with pytest.raises(scu.SendError, match="captured"):
        scu.echo("PNEUMONODE", scu.Remote("ANY-SCP", "127.0.0.1", 104))
    as_requestor = rows["Maximum PDU length received, as requestor (sending results, echo, send)"]
    ((_, advertised),) = proposed
    assert advertised == int(as_requestor)


def test_implementation_identification(default_settings: Settings) -> None:
    (row,) = table("implementation-identification")
    assert row["pynetdicom version"] == pynetdicom.__version__, (
        "update the implementation-identification table of docs/conformance.md for the "
        f"installed pynetdicom {pynetdicom.__version__}"
    )
    listener = build_ae(default_settings)
    sender = scu._make_ae("PNEUMONODE", scu.Timeouts())
    for ae in (listener, sender):
        assert ae.implementation_class_uid == row["Implementation Class UID"]
        assert ae.implementation_version_name == row["Implementation Version Name"]


# statuses ---------------------------------------------------------------------------------------


def test_cstore_statuses_are_those_the_node_answers() -> None:
    stated = [int(code, 16) for code in column("cstore-statuses", "Status")]
    assert sorted(stated) == sorted(int(s) for s in Status)


def test_destination_statuses_are_judged_as_stated() -> None:
    for row in table("destination-statuses"):
        success = {"success": True, "failure": False}[row["Treated as"]]
        cell = row["Status from the destination"]
        codes_named = [int(c, 16) for c in re.findall(r"0x[0-9A-Fa-f]{4}", cell)]
        span = re.match(r"(0x[0-9A-F]{4}) to (0x[0-9A-F]{4})", cell)
        if span is not None:
            low, high = int(span.group(1), 16), int(span.group(2), 16)
            codes_named += [low, (low + high) // 2, high]
        assert codes_named, row
        for code in codes_named:
            outcome = scu.StoreOutcome(Path("x.dcm"), "1.2.3", code)
            assert outcome.ok is success, f"0x{code:04X}: stated {row['Treated as']}"


# security ---------------------------------------------------------------------------------------


def test_tls_cipher_suites_and_minimum_version() -> None:
    assert column("tls-ciphers", "TLS 1.2 cipher suite (OpenSSL name)") == BCP195_CIPHERS.split(":")
    text = STATEMENT.read_text(encoding="utf-8")
    assert "TLS 1.2 or later" in text
    assert _base(ssl.PROTOCOL_TLS_CLIENT).minimum_version == ssl.TLSVersion.TLSv1_2


# coded terminology ------------------------------------------------------------------------------


def test_coded_terminology_lists_every_code_the_node_chooses() -> None:
    chosen: list[Code] = [getattr(output_codes, name) for name in output_codes.__all__]
    chosen += [codes.SCT.Area, codes.DCM.Probability]  # the SR's measurements (outputs/sr.py)
    expected = {(c.value, c.scheme_designator): c.meaning for c in chosen}
    rows = table("coded-terminology")
    stated = {(row["Code Value"], row["Coding Scheme"]): row["Code Meaning"] for row in rows}
    assert len(stated) == len(rows)
    assert stated == expected


# (e) settings -----------------------------------------------------------------------------------


def _section_model(name: str, is_list: bool) -> type[BaseModel]:
    field = Settings.model_fields.get(name)
    assert field is not None, f"no settings section {name!r}"
    inner = [a for a in get_args(field.annotation) if isinstance(a, type)]
    if is_list:
        assert inner and issubclass(inner[0], BaseModel), f"{name} is not a list of tables"
        return inner[0]
    model = field.annotation
    assert isinstance(model, type) and issubclass(model, BaseModel), f"{name} is not a section"
    return model


def _field(key: str) -> Any:
    match = SETTING.match(key)
    assert match is not None, f"{key!r} is not written section.key or section[].key"
    model = _section_model(match.group(1), match.group(2) is not None)
    field = model.model_fields.get(match.group(3))
    assert field is not None, f"the statement names {key}, which the settings do not have"
    return field


def _plain(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _stated_default(cell: str) -> object:
    if cell == "(none)":
        return None
    if cell == "(required)":
        return REQUIRED
    return tomllib.loads(f"value = {cell}")["value"]


def test_settings_table_gives_each_key_its_default() -> None:
    rows = table("settings")
    assert len({row["Setting"] for row in rows}) == len(rows), "a setting is listed twice"
    for row in rows:
        field = _field(row["Setting"])
        stated = _stated_default(row["Default"])
        if stated is REQUIRED:
            assert field.is_required(), f"{row['Setting']} is not required"
            continue
        assert not field.is_required(), f"{row['Setting']} is required"
        actual = _plain(field.get_default(call_default_factory=True))
        assert stated == actual, f"{row['Setting']}: statement {stated!r}, code {actual!r}"
        assert isinstance(stated, bool) == isinstance(actual, bool), row["Setting"]


def test_every_setting_named_in_the_statement_exists() -> None:
    text = STATEMENT.read_text(encoding="utf-8")
    named = {token for token in re.findall(r"`([^`\s]+)`", text) if SETTING.match(token)}
    assert len(named) > 30
    for key in sorted(named):
        _field(key)
