"""Where a job's results go: each destination (and the sender) with the objects it takes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pneumonode.queue.records import DeliveryTarget
from pneumonode.results import ResultKind
from pneumonode.settings import Destination, Peer, Settings

LOGGER = logging.getLogger(__name__)

PEER_PREFIX = "peer:"
"""Deliveries back to the calling AE are named ``peer:<AE title>``."""

Route = Destination | Peer
"""Where a delivery goes, as configured: a ``[[destinations]]`` or a ``[[peers]]`` entry."""


def route_name(route: Route) -> str:
    """The name a delivery to ``route`` carries: the destination's, or ``peer:<AE title>``."""
    return route.name if isinstance(route, Destination) else f"{PEER_PREFIX}{route.ae_title}"


def peer_ae_title(name: str) -> str | None:
    """The AE title of a ``peer:<AE title>`` delivery name, or None for a destination's name."""
    return name.removeprefix(PEER_PREFIX) if name.startswith(PEER_PREFIX) else None


def configured_route(settings: Settings, name: str) -> Route | None:
    """The entry of ``settings`` a delivery name points at, or None when none is configured."""
    ae_title = peer_ae_title(name)
    if ae_title is not None:
        return settings.peer(ae_title)
    return next((d for d in settings.destinations if d.name == name), None)


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
                    destination=route_name(peer),
                    ae_title=peer.ae_title,
                    host=peer.host,
                    port=peer.port,
                    kinds=tuple(made),
                )
            )
    if only is not None:
        targets = [t for t in targets if t.destination == only]
    return targets
