"""The hostile-input corpus through one running node: each case gets its documented outcome."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import synthetic
from harness import storescu, wait_for
from hostile.conftest import HostileNode
from hostile.corpus import Case, build_cases, log_forbidden
from hostile.wire import echo, store_raw

from pneumonode.queue.records import JobView

README = Path(__file__).with_name("README.md")
TERMINAL = {"done", "skipped", "failed"}
#: What may lie under the data folder; anything else (a UID turned into a path) fails the test.
ALLOWED_PATHS = re.compile(
    r"^(pneumonode\.db(-wal|-shm)?|spool|spool/incoming|spool/\d{8}|spool/\d{8}/[0-9a-f]{32}\.dcm"
    r"|results|results/\d{9}|results/\d{9}/(seg|overlay|sr)\.dcm)$"
)

pytestmark = pytest.mark.slow


def _outcome(answer: str, job: JobView | None) -> str:
    if answer != "status:0x0000":
        return answer if job is None else f"{answer} but a job exists ({job.state})"
    if job is None:
        return "acknowledged without a job"
    return f"{job.state}:{job.skip_reason or job.last_error or ''}"


def _matches(expected: str, actual: str) -> bool:
    kind, _, text = expected.partition(":")
    if kind in ("skipped", "failed"):
        return actual.startswith(f"{kind}:") and text in actual
    if kind == "done":
        return actual.startswith("done:")
    return actual == expected


def _documented() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| [^|]+ \| `([^`]+)` \|", README.read_text(), re.M)
    return dict(rows)


def test_readme_documents_every_case_with_its_outcome() -> None:
    cases = build_cases()
    assert len(cases) >= 40
    assert _documented() == {c.name: c.expected for c in cases}


def test_corpus_gets_documented_outcomes_and_node_keeps_serving(
    hostile_node: HostileNode, tmp_path: Path
) -> None:
    cases = build_cases()
    answers = {c.name: store_raw(hostile_node.port, c, tmp_path) for c in cases}
    repeated = next(c for c in cases if c.name == "name-latin1")
    assert store_raw(hostile_node.port, repeated, tmp_path) == "status:0x0000"
    acknowledged = {c.sop_instance_uid for c in cases if answers[c.name] == "status:0x0000"}
    repo = hostile_node.repo
    ours = {c.sop_instance_uid for c in cases}  # other tests share this node

    def corpus_jobs() -> dict[str, JobView]:
        return {j.sop_instance_uid: j for j in repo.list_jobs(limit=10_000)
                if j.sop_instance_uid in ours}

    def settled() -> bool:
        jobs = corpus_jobs()
        return len(jobs) >= len(acknowledged) and all(j.state in TERMINAL for j in jobs.values())

    wait_for(settled, 180, "every acknowledged case to end done, skipped or failed")
    jobs = corpus_jobs()
    actual = {c.name: _outcome(answers[c.name], jobs.get(c.sop_instance_uid)) for c in cases}
    wrong = {c.name: (c.expected, actual[c.name]) for c in cases
             if not _matches(c.expected, actual[c.name])}
    assert wrong == {}, "\n".join(f"{n}: expected {e}, got {a}" for n, (e, a) in wrong.items())
    assert set(jobs) == acknowledged, "one job per acknowledged case, the repeat included"

    data_dir = hostile_node.data_dir
    strays = [p for p in data_dir.rglob("*")
              if not ALLOWED_PATHS.match(p.relative_to(data_dir).as_posix())]
    assert strays == []

    valid = [synthetic.write(synthetic.make_radiograph(rows=64, columns=64, seed=900 + i),
                             tmp_path / f"valid{i}.dcm") for i in range(2)]
    sent = storescu(valid, hostile_node.port, aet="VALID")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    uids = {str(synthetic.make_radiograph(rows=64, columns=64, seed=900 + i).SOPInstanceUID)
            for i in range(2)}

    def valid_done() -> bool:
        states = {j.sop_instance_uid: j.state for j in repo.list_jobs(limit=1000)}
        return all(states.get(uid) == "done" for uid in uids)

    wait_for(valid_done, 120, "the valid images sent after the corpus to be done")
    assert hostile_node.alive(), hostile_node.process.tail()
    assert echo(hostile_node.port) == 0
    log = hostile_node.log()
    assert [word for word in log_forbidden() if word in log] == []


def test_case_ids_are_unique_per_instance() -> None:
    cases: list[Case] = build_cases()
    uids = [c.sop_instance_uid for c in cases]
    assert all(uids) and len(set(uids)) == len(uids)
