"""The chaos campaign's audit: what the store, the ledger, Redis and the fake Bot API say once
the load has stopped and everything is back, checked against the pipeline's promises; and the
table it prints."""

from __future__ import annotations

import collections
import dataclasses
import statistics

import redis
from sqlalchemy import text
from sqlmodel import Session

from bench.chaos_faults import KINDS, Fault
from bench.chaos_load import Sent
from cluster import keys
from storage import ledger
from storage.db import make_engine

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclasses.dataclass
class Report:
    seeds: dict[str, int]
    duration_s: float
    faults: dict[str, int]
    outcomes: dict[str, int]
    violations: list[str]
    recovery: dict[str, tuple[float, float, int]]  # kind -> (p50, max, measured)
    notes: list[str]

    def table(self) -> str:
        lines = [f"chaos campaign: {self.duration_s:.0f} s of load, seeds {self.seeds}", "",
                 "faults injected by kind        n   recover p50   max (s)"]
        for kind in KINDS:
            p50, mx, n = self.recovery.get(kind, (float("nan"), float("nan"), 0))
            lines.append(f"  {kind:<26} {self.faults.get(kind, 0):>4}   {p50:>8.1f} {mx:>8.1f}"
                         + ("" if n == self.faults.get(kind, 0) else f"  ({n} measured)"))
        lines.append(f"  {'total':<26} {sum(self.faults.values()):>4}")
        lines += ["", "jobs by outcome"]
        lines += [f"  {k:<26} {v:>6}" for k, v in sorted(self.outcomes.items())]
        lines += ["", f"violations: {len(self.violations)}"]
        lines += [f"  {v}" for v in self.violations[:50]]
        lines += ["", "notes"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def recovery(faults: list[Fault], sent: list[Sent], job_of_key: dict[str, str],
             photos: list[tuple[float, str]]) -> dict[str, tuple[float, float, int]]:
    """Per kind: seconds from the fault until a job sent after it had its photo posted (the
    service works again end to end)."""
    sent_at = {job_of_key[s.key]: s.at for s in sent if s.key in job_of_key}
    firsts = sorted((t, sent_at[j]) for t, j in photos if j in sent_at)
    out: dict[str, list[float]] = collections.defaultdict(list)
    for f in faults:
        if f.injected is None:
            continue
        after = next((t for t, s in firsts if s >= f.injected), None)
        if after is not None:
            out[f.kind].append(after - f.injected)
    return {k: (statistics.median(v), max(v), len(v)) for k, v in out.items()}


def audit(*, db_url: str, redis_url: str, claim_ms: int, sent: list[Sent],
          photos: list[tuple[float, str]], faults: list[Fault],
          memory: dict[str, list[tuple[float, int]]], seeds: dict[str, int],
          duration_s: float) -> Report:
    violations: list[str] = []
    notes: list[str] = []
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            jobs = conn.execute(text(
                "select id, idempotency_key, status, attempts, delivered_at, error "
                "from jobs")).all()
            rows = conn.execute(text(
                "select job_id, kind, count(*) from credit_ledger where job_id is not null "
                "group by job_id, kind")).all()
            accounts = [int(a) for (a,) in conn.execute(text("select id from accounts")).all()]
        with Session(engine) as s:
            audits = [ledger.audit(session=s, account_id=a) for a in accounts]
    finally:
        engine.dispose()
    ledger_by_job: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for job_id, kind, n in rows:
        ledger_by_job[job_id][str(getattr(kind, "value", kind))] = int(n)
    posted = collections.Counter(j for _, j in photos)
    outcomes: collections.Counter[str] = collections.Counter()
    job_of_key = {str(k): str(j) for j, k, *_ in jobs}
    bot_kills = [f.injected for f in faults if f.kind == "bot_kill" and f.injected is not None]
    for job_id, _key, status, _attempts, delivered_at, _error in jobs:
        status = str(getattr(status, "value", status))
        outcomes[status] += 1
        entries = ledger_by_job.get(job_id, {})
        captured, released = entries.get("capture", 0), entries.get("release", 0)
        if status not in TERMINAL:
            violations.append(f"job {job_id} stuck: {status}")
            continue
        if status == "succeeded":
            if (captured, released) != (1, 0):
                violations.append(f"job {job_id} succeeded: captured {captured}, released "
                                  f"{released} (want 1, 0)")
            if posted[job_id] != 1:
                across = " (a bot SIGKILL between them)" if posted[job_id] > 1 and \
                    killed_between(job_id, photos, bot_kills) else ""
                violations.append(f"job {job_id} succeeded: {posted[job_id]} photos posted"
                                  f"{across}")
        else:
            if (captured, released) != (0, 1):
                violations.append(f"job {job_id} {status}: captured {captured}, released "
                                  f"{released} (want 0, 1)")
            if posted[job_id]:
                violations.append(f"job {job_id} {status}: {posted[job_id]} photos posted")
        if delivered_at is None:
            violations.append(f"job {job_id} {status}: never marked delivered")
    unknown = set(posted) - set(job_of_key.values())
    if unknown:
        violations.append(f"photos posted for jobs not in the store: {sorted(unknown)[:5]}")
    for a in audits:
        if not (a.balanced and a.conserved and a.held == 0):
            violations.append(f"account {a.account_id} ledger: {a!r}")
    violations += pending_past_claim(redis_url, claim_ms)
    violations += memory_growth(memory, notes)

    by_kind = collections.Counter(s.kind for s in sent)
    made = collections.Counter(s.kind for s in sent if s.key in job_of_key)
    notes.append("updates sent (made a job): " + ", ".join(
        f"{k} {by_kind[k]} ({made[k]})" for k in sorted(by_kind)))
    notes.append(f"cancels pressed: {sum(s.cancel_pressed for s in sent)}")
    attempts = collections.Counter(int(j[3]) for j in jobs)
    notes.append("attempts per job: " + ", ".join(f"{k}: {v}" for k, v in sorted(
        attempts.items())))
    faults_by_kind = collections.Counter(f.kind for f in faults if f.injected is not None)
    failed_faults = [f"{f.kind}: {f.detail}" for f in faults if f.injected is None]
    if failed_faults:
        notes.append(f"faults not injected: {failed_faults[:5]}")
    return Report(seeds, duration_s, dict(faults_by_kind), dict(outcomes), violations,
                  recovery(faults, sent, job_of_key, photos), notes)


def killed_between(job_id: str, photos: list[tuple[float, str]], kills: list[float]) -> bool:
    """The bot was SIGKILLed between each two of a job's photos (said beside the violation:
    where to look first)."""
    times = sorted(t for t, j in photos if j == job_id)
    return all(any(a <= k <= b for k in kills) for a, b in zip(times, times[1:], strict=False))


def pending_past_claim(redis_url: str, claim_ms: int) -> list[str]:
    """Entries read and never acked, idle past the claim timeout (nobody took them over)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    out = []
    try:
        streams: list[tuple[str, str]] = [(keys.JOBS_STREAM, keys.DISPATCHER_GROUP)]
        for stream in client.scan_iter(match=keys.DELIVERIES_PREFIX + "*"):
            for info in client.xinfo_groups(stream):
                streams.append((str(stream), str(info["name"])))
        for stream, group in streams:
            if not client.exists(stream):
                continue
            try:
                pending = client.xpending_range(stream, group, "-", "+", 1000)
            except redis.ResponseError:
                continue  # no such group (Redis restarted empty and nothing came since)
            stale = [p for p in pending if int(p["time_since_delivered"]) > claim_ms]
            if stale:
                out.append(f"{len(stale)} entries of {stream} pending in {group} past the "
                           f"claim timeout: {stale[:3]}")
    finally:
        client.close()
    return out


def memory_growth(memory: dict[str, list[tuple[float, int]]], notes: list[str]) -> list[str]:
    """A process that lived through most of the run must not keep growing: its RSS over the
    last third against the second third, over 50% and 300 MB more is a leak."""
    out = []
    longest: dict[str, tuple[float, float, float]] = {}
    for proc, samples in memory.items():
        if len(samples) < 9:
            continue
        third = len(samples) // 3
        mid = statistics.median(r for _, r in samples[third : 2 * third])
        end = statistics.median(r for _, r in samples[2 * third :])
        span = samples[-1][0] - samples[0][0]
        role = proc.split(":")[0]
        if span > longest.get(role, (0.0, 0.0, 0.0))[0]:
            longest[role] = (span, mid / 2**20, end / 2**20)
        if end > mid * 1.5 and end - mid > 300 * 2**20:
            out.append(f"{proc} grew from {mid / 2**20:.0f} to {end / 2**20:.0f} MiB")
    for role, (span, mid, end) in sorted(longest.items()):
        notes.append(f"memory {role} (longest-lived, {span:.0f} s): {mid:.0f} -> {end:.0f} MiB")
    return out
