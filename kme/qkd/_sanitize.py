"""The sanitizing proxy of paper section IV-A.1: what a device may see of a Key request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kme.etsi014 import KeyRequest

__all__ = ["OVERLAY_EXTENSION_PREFIX", "OverlayFields", "sanitize"]

# Extensions whose name carries this vendor prefix (ETSI 014 clause 4.2
# naming) are kmstn's own overlay fields and never go to a device.
OVERLAY_EXTENSION_PREFIX: Final = "kmstn_"


@dataclass(frozen=True, slots=True)
class OverlayFields:
    """What :func:`sanitize` kept back from the device, for routing."""

    additional_slave_sae_ids: tuple[str, ...] = ()
    extension_mandatory: tuple[dict[str, Any], ...] = ()
    extension_optional: tuple[dict[str, Any], ...] = ()


def _split(entries: Sequence[Mapping[str, Any]]) -> tuple[tuple[dict[str, Any], ...],
                                                             tuple[dict[str, Any], ...]]:
    device: list[dict[str, Any]] = []
    overlay: list[dict[str, Any]] = []
    for entry in entries:
        for name, value in entry.items():
            (overlay if name.startswith(OVERLAY_EXTENSION_PREFIX) else device).append(
                {name: value})
    return tuple(device), tuple(overlay)


def sanitize(req: KeyRequest) -> tuple[KeyRequest, OverlayFields]:
    """Paper IV-A.1: the request for the local device, and the overlay fields kept back.

    The device gets the same ``number`` and ``size`` and any extension that
    is not kmstn's; it never sees ``additional_slave_SAE_IDs`` (SAEs on
    other nodes, unknown to a point-to-point device, which would refuse
    them) nor ``kmstn_*`` extensions.
    """
    dev_mand, ovl_mand = _split(req.extension_mandatory)
    dev_opt, ovl_opt = _split(req.extension_optional)
    device_req = KeyRequest(number=req.number, size=req.size,
                            extension_mandatory=dev_mand, extension_optional=dev_opt)
    return device_req, OverlayFields(req.additional_slave_sae_ids, ovl_mand, ovl_opt)
