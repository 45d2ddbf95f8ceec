"""Where a job's results go: each destination (and the sender) with the objects it takes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pneumonode.queue.records import DeliveryTarget
from pneumonode.results import ResultKind
from pneumonode.settings import Destination, Settings

LOGGER = logging.getLogger(__name__)

PEER_PREFIX = "peer:"
"""Deliveries back to the calling AE are named ``peer:<AE title>``."""


def _target(destination: Destination, made: Sequence[ResultKind], positive: bool) -> (
    DeliveryTarget | None
):
    """The delivery of one destination, or None when its rules leave it nothing."""
    if destination.only_positive and not positive:
        return None
    kinds = tuple(k for k in made if k in destination.objects)
    if not kinds:
        return None
    return DeliveryTarget(
        destination=destination.name,
        ae_title=destination.ae_title,
        host=destination.host,
        port=destination.port,
        kinds=kinds,
    )


def delivery_targets(
    settings: Settings,
    calling_aet: str,
    *,
    positive: bool,
    made: Sequence[ResultKind],
    only: str | None = None,
) -> list[DeliveryTarget]:
    """The deliveries of one job's results.

    Parameters
    ----------
    settings:
        ``[[destinations]]``, ``[[peers]]`` and ``delivery.return_to_sender`` in force.
    calling_aet:
        Who sent the image (gets every result made when ``return_to_sender`` is on and it is a
        ``[[peers]]`` entry).
    positive:
        Whether pneumothorax was found: destinations with ``only_positive`` get nothing
        otherwise.
    made:
        The result kinds the job has.
    only:
        Keep only the destination of this name (``peer:AE`` for the sender).

    Returns
    -------
    list of DeliveryTarget
        In configuration order, the sender last; a destination whose rules leave it nothing
        is left out.
    """
    targets = [
        target
        for d in settings.destinations
        if (target := _target(d, made, positive)) is not None
    ]
    if settings.delivery.return_to_sender and made:
        peer = settings.peer(calling_aet)
        if peer is None:
            LOGGER.warning(
                "return_to_sender is on but calling AE %r has no [[peers]] entry", calling_aet
            )
        else:
            targets.append(
                DeliveryTarget(
                    destination=f"{PEER_PREFIX}{peer.ae_title}",
                    ae_title=peer.ae_title,
                    host=peer.host,
                    port=peer.port,
                    kinds=tuple(made),
                )
            )
    if only is not None:
        targets = [t for t in targets if t.destination == only]
    return targets
