"""What ``/sdapi/v1/progress`` reports: the job each API key's A1111 call is waiting for, in
this process (A1111 has one global progress; Atelier keeps one per key, so two people's clients
never see each other's work)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from web.api.sdapi_models import ProgressResponse, ProgressState


@dataclass
class Running:
    job_id: str
    job_count: int
    timestamp: str
    started: float = field(default_factory=time.monotonic)
    step: int = 0
    total: int = 0
    running: bool = False
    interrupted: bool = False
    skipped: bool = False


class ProgressBoard:
    """Per key id: the A1111 calls in flight, oldest first."""

    def __init__(self) -> None:
        self._by_key: dict[int, list[Running]] = {}

    def start(self, key_id: int, entry: Running) -> None:
        self._by_key.setdefault(key_id, []).append(entry)

    def finish(self, key_id: int, entry: Running) -> None:
        entries = self._by_key.get(key_id, [])
        if entry in entries:
            entries.remove(entry)
        if not entries:
            self._by_key.pop(key_id, None)

    def current(self, key_id: int) -> Running | None:
        entries = self._by_key.get(key_id)
        return entries[0] if entries else None

    def all(self, key_id: int) -> list[Running]:
        return list(self._by_key.get(key_id, []))

    def report(self, key_id: int) -> ProgressResponse:
        entry = self.current(key_id)
        if entry is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
        fraction = entry.step / entry.total if entry.total else 0.0
        elapsed = time.monotonic() - entry.started
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state = ProgressState(
            skipped=entry.skipped,
            interrupted=entry.interrupted,
            job=f"job {entry.job_id}" if entry.running else f"queued {entry.job_id}",
            job_count=entry.job_count,
            job_timestamp=entry.timestamp,
            job_no=0,
            sampling_step=entry.step,
            sampling_steps=entry.total,
        )
        return ProgressResponse(
            progress=round(fraction, 4), eta_relative=round(max(0.0, eta), 3), state=state,
            textinfo=None if entry.running else "waiting in the queue",
        )
