"""Who may associate: calling AE titles, bound to peer addresses, and the association slots."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Mapping

from pynetdicom.association import Association
from pynetdicom.events import Event

from pneumonode.dicom.wire_limits import slot_holders
from pneumonode.settings import Settings

LOGGER = logging.getLogger(__name__)

#: A-ASSOCIATE-RJ: rejected-permanent, by the service user, "calling AE title not recognized".
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
#: A-ASSOCIATE-RJ: rejected-transient, by the service provider (presentation), "local limit
#: exceeded", as pynetdicom itself answers beyond ``maximum_associations``.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(text: str) -> IPAddress | None:
    """The address in ``text`` (IPv6 zone removed, IPv4-mapped IPv6 as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def resolve_host(host: str) -> frozenset[IPAddress]:
    """Every address of ``host`` (an IPv4/IPv6 literal or a name); empty when it cannot resolve."""
    literal = _ip(host)
    if literal is not None:
        return frozenset({literal})
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        LOGGER.warning("cannot resolve peer host %r: %s; that peer cannot associate", host, exc)
        return frozenset()
    found = {_ip(str(info[4][0])) for info in infos}
    return frozenset(a for a in found if a is not None)


class AccessPolicy:
    """Who may associate: an allowlist of calling AE titles, optionally bound to source addresses.

    Parameters
    ----------
    allowed_calling_aets:
        Calling AE titles allowed; empty allows any (unless ``peer_addresses`` is given).
    peer_addresses:
        When given, the calling AE title must be a key and the connection must come from one of
        its addresses (``node.check_peer_host``).
    """

    def __init__(
        self,
        allowed_calling_aets: Iterable[str] = (),
        peer_addresses: Mapping[str, frozenset[IPAddress]] | None = None,
    ) -> None:
        self._allowed = frozenset(a.strip() for a in allowed_calling_aets)
        self._peers = None if peer_addresses is None else dict(peer_addresses)

    @classmethod
    def from_settings(
        cls, settings: Settings, resolve: Callable[[str], frozenset[IPAddress]] = resolve_host
    ) -> AccessPolicy:
        """The policy of ``[node]`` and ``[[peers]]``; peer host names are resolved once, here."""
        peers: dict[str, frozenset[IPAddress]] | None = None
        if settings.node.check_peer_host:
            peers = {p.ae_title: resolve(p.host) for p in settings.peers}
        return cls(settings.node.allowed_calling_aets, peers)

    def refusal(self, calling_aet: str, address: str) -> str | None:
        """Why an association from ``calling_aet`` at ``address`` is refused, or None."""
        calling = calling_aet.strip()
        if self._allowed and calling not in self._allowed:
            return f"calling AE title {calling!r} is not in node.allowed_calling_aets"
        if self._peers is None:
            return None
        if calling not in self._peers:
            return f"calling AE title {calling!r} is not a [[peers]] entry (node.check_peer_host)"
        source = _ip(address)
        if source is None or source not in self._peers[calling]:
            return (
                f"calling AE title {calling!r} connected from {address}, not from its [[peers]] "
                "host (node.check_peer_host)"
            )
        return None


def handle_requested(event: Event, policy: AccessPolicy | Callable[[], AccessPolicy]) -> None:
    """Reject an association request that the access policy refuses, before negotiation, or
    that finds every association slot taken.

    ``policy`` is the policy, or a function returning the one in force (it may be reloaded).
    The rejection is permanent with the reason "calling AE title not recognized" (PS3.8 9.3.4).
    A request that cannot be checked is rejected too. Beyond ``node.max_associations`` the
    rejection is transient, "local limit exceeded", logged with the peers holding the slots.
    """
    assoc = event.assoc
    address = str(assoc.requestor.address)
    calling = "?"
    try:
        primitive = assoc.requestor.primitive
        if primitive is None:
            raise ValueError("no A-ASSOCIATE request primitive")
        calling = str(primitive.calling_ae_title).strip()
        current = policy if isinstance(policy, AccessPolicy) else policy()
        refusal = current.refusal(calling, address)
    except Exception:  # fail closed: an unchecked request must not get in
        LOGGER.exception("cannot check the association request from %s", address)
        refusal = "the association request could not be checked"
    if refusal is None:
        _reject_over_limit(assoc, address, calling)
        return
    LOGGER.warning("association from %s as %r rejected: %s", address, calling, refusal)
    assoc.acse.send_reject(*REJECT_CALLING_AE)
    assoc.kill()


def _reject_over_limit(assoc: Association, address: str, calling: str) -> None:
    """Reject ``assoc`` when more acceptors run than ``maximum_associations`` (pynetdicom's own
    count, itself included), naming the holders; pynetdicom would reject it without a word."""
    acceptors = [a for a in assoc.ae.active_associations if a.is_acceptor]
    if len(acceptors) <= assoc.ae.maximum_associations:
        return
    LOGGER.warning(
        "association from %s as %r rejected: local limit exceeded (node.max_associations = %d); "
        "slots held by: %s",
        address,
        calling,
        assoc.ae.maximum_associations,
        slot_holders(a for a in acceptors if a is not assoc),
    )
    assoc.acse.send_reject(*REJECT_LOCAL_LIMIT)
    assoc.kill()
