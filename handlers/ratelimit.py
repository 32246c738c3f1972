"""Per-device token buckets for `limits.device_rate` (off when the rate is 0)."""

from __future__ import annotations

import time


class DeviceRateLimiter:
    """Allows `rate` operations a second per device with bursts of `burst`.

    Off by default: a backlog redelivered after an outage arrives all at once and
    must not be refused. Buckets of idle devices are dropped to bound memory.
    """

    def __init__(self, rate: float, burst: int, max_devices: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_devices = max_devices
        self._buckets: dict[str, tuple[float, float]] = {}

    def __call__(self, device_id: str, n: int) -> int:
        if self.rate <= 0:
            return n
        now = time.monotonic()
        tokens, last = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = min(n, int(tokens))
        if len(self._buckets) >= self.max_devices and device_id not in self._buckets:
            self._evict_full(now)
        self._buckets[device_id] = (tokens - allowed, now)
        return allowed

    def _evict_full(self, now: float) -> None:
        """Forget buckets that have refilled: they hold no information."""
        full_after = self.burst / self.rate
        self._buckets = {
            device: state for device, state in self._buckets.items() if now - state[1] < full_after
        }
