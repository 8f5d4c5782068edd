"""Each QKD device's pool level and measured key rate, polled by the relay.

The gauges are kme.metrics' DEVICE_STORED_KEYS, DEVICE_MAX_KEYS and
DEVICE_KEY_RATE; the bits this process took come back from kme.qkd's
DEVICE_KEY_BITS (:func:`kme.metrics.device_bits_taken`). The last poll of
each device also feeds the relay's link state (relay/linkstate.py).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kme.metrics import DEVICE_KEY_RATE, DEVICE_MAX_KEYS, DEVICE_STORED_KEYS, device_bits_taken

__all__ = ["DeviceObservation", "DevicePoller"]


class _StatusSource(Protocol):
    """What DevicePoller needs of a kme.qkd.QkdDeviceClient."""

    @property
    def link_id(self) -> str: ...

    def status(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class DeviceObservation:
    """The last poll of one device: did it answer, what rate, how much key stored."""

    reachable: bool
    rate_bps: float | None  # None: fewer than two answers in the window yet
    stored_keys: int
    max_keys: int


class DevicePoller:
    """Polls each QKD device's status, sets pool level and measured key rate.

    The rate over the last ``window_s``: (stored bits now - stored bits then
    + key bits this process took meanwhile) / elapsed time. kme.qkd counts
    the bits taken (DEVICE_KEY_BITS) and this reads them back, so nothing
    else has to tell the poller about draws. :meth:`observations` gives the
    last poll of each device to the relay's link state (relay/linkstate.py).
    """

    def __init__(self, devices: Sequence[_StatusSource], interval_s: float,
                 log: logging.Logger, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._devices = list(devices)
        self._interval = interval_s
        self._window = max(window_s, interval_s)
        self._log = log
        self._clock = clock
        self._stop = threading.Event()
        self._samples: dict[str, collections.deque[tuple[float, float]]] = {
            d.link_id: collections.deque() for d in self._devices}
        self._failing: set[str] = set()
        self._seen: dict[str, DeviceObservation] = {}
        self._thread = threading.Thread(target=self._run, name="metrics-devices", daemon=True)

    def observations(self) -> dict[str, DeviceObservation]:
        """Per link, the device's last poll (links not polled yet are absent)."""
        return dict(self._seen)

    def start(self) -> None:
        if self._devices and self._interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def poll_once(self) -> None:
        for device in self._devices:
            link = device.link_id
            try:
                st = device.status()
            except Exception as exc:
                if link not in self._failing:  # log a failing device once, not every poll
                    self._log.warning("device status failed", extra={
                        "link_id": link, "error": getattr(exc, "public", type(exc).__name__)})
                    self._failing.add(link)
                old = self._seen.get(link)
                self._seen[link] = DeviceObservation(False, None, old.stored_keys if old else 0,
                                                     old.max_keys if old else 0)
                continue
            self._failing.discard(link)
            DEVICE_STORED_KEYS.labels(link).set(st.stored_key_count)
            DEVICE_MAX_KEYS.labels(link).set(st.max_key_count)
            now = self._clock()
            # Stored key counts in the device's own key size; taken bits are bits.
            inflow = st.stored_key_count * st.key_size + device_bits_taken(link)
            samples = self._samples[link]
            samples.append((now, inflow))
            while len(samples) > 2 and now - samples[1][0] >= self._window:
                samples.popleft()
            rate = None
            if len(samples) >= 2 and now > samples[0][0]:
                t0, v0 = samples[0]
                rate = max(0.0, (inflow - v0) / (now - t0))
                DEVICE_KEY_RATE.labels(link).set(rate)
            self._seen[link] = DeviceObservation(True, rate, int(st.stored_key_count),
                                                 int(st.max_key_count))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self._interval)
