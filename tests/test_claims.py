"""HeldClaims: heartbeats for held ids; a claim that is no longer ours is dropped quietly."""

from __future__ import annotations

from pneumonode.claims import HeldClaims
from pneumonode.queue.records import StaleTransition


def test_beats_held_ids_and_drops_stale_ones() -> None:
    beaten: list[int] = []

    def heartbeat(row_id: int) -> None:
        if row_id == 2:
            raise StaleTransition("job 2 left processing")
        beaten.append(row_id)

    claims = HeldClaims(heartbeat)
    claims.hold(1, 2, 3)
    claims.release(3)
    claims.beat()
    assert sorted(beaten) == [1]
    beaten.clear()
    claims.beat()
    assert beaten == [1], "the stale claim is no longer heartbeated"
