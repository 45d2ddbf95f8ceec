"""Routing: which destination gets which results (objects, positives only, the sender)."""

from __future__ import annotations

from pneumonode.results import ALL_KINDS, ResultKind
from pneumonode.routing import delivery_targets
from pneumonode.settings import Settings

SEG, SC, SR = ResultKind.SEG, ResultKind.SC, ResultKind.SR


def _settings(**extra: object) -> Settings:
    return Settings(
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.1", "port": 104},
            {"name": "old-pacs", "ae_title": "OLD", "host": "10.0.0.2", "port": 104,
             "objects": ["sc", "sr"]},
            {"name": "worklist", "ae_title": "TRIAGE", "host": "10.0.0.3", "port": 104,
             "objects": ["sr"], "only_positive": True},
        ],
        peers=[{"ae_title": "CR1", "host": "10.0.0.9", "port": 104}],
        **extra,  # type: ignore[arg-type]
    )


def _routes(settings: Settings, positive: bool, made: tuple[ResultKind, ...] = ALL_KINDS,
            **kw: object) -> dict[str, tuple[ResultKind, ...]]:
    targets = delivery_targets(settings, "CR1", positive=positive, made=made, **kw)  # type: ignore[arg-type]
    return {t.destination: t.kinds for t in targets}


def test_each_destination_gets_its_objects_and_a_worklist_only_positives() -> None:
    settings = _settings()
    assert _routes(settings, positive=True) == {
        "pacs": (SEG, SC, SR), "old-pacs": (SC, SR), "worklist": (SR,)}
    assert _routes(settings, positive=False) == {"pacs": (SEG, SC, SR), "old-pacs": (SC, SR)}


def test_only_what_was_made_is_routed() -> None:
    settings = _settings()
    assert _routes(settings, positive=True, made=(SEG, SC)) == {
        "pacs": (SEG, SC), "old-pacs": (SC,)}


def test_the_sender_gets_everything_made_and_one_destination_can_be_picked() -> None:
    settings = _settings(delivery={"return_to_sender": True})
    routes = _routes(settings, positive=False)
    assert routes["peer:CR1"] == (SEG, SC, SR)
    assert _routes(settings, positive=True, only="worklist") == {"worklist": (SR,)}
    assert _routes(settings, positive=False, only="worklist") == {}
