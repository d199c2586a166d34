"""Forming batches fairly: a queue per account served round-robin, and a batch filled with jobs
that share the head job's batch key, one per account per round, within a worker's budget."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class Waiting(Generic[K]):
    """A job waiting for a batch: who owns it, what it can share a call with, what it costs."""

    job_id: str
    account_id: int
    key: K  # jobs with equal keys may share one pipeline call
    pixels: int  # what the job adds to a batch (width x height x images)
    payload: object = field(default=None, compare=False, repr=False)


class FairQueue(Generic[K]):
    """Jobs by account. Each batch starts with the oldest job of the account whose turn it is,
    then takes jobs with the same key round-robin across accounts, so one account with many
    queued jobs gets one slot per round like everybody else."""

    def __init__(self) -> None:
        self._by_account: dict[int, deque[Waiting[K]]] = {}
        self._turns: deque[int] = deque()  # accounts with jobs, whose turn is next first
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids

    def __iter__(self) -> Iterator[Waiting[K]]:
        for account in self._turns:
            yield from self._by_account[account]

    def add(self, item: Waiting[K]) -> None:
        if item.job_id in self._ids:
            raise ValueError(f"job {item.job_id} is already queued")
        jobs = self._by_account.get(item.account_id)
        if jobs is None:
            jobs = self._by_account[item.account_id] = deque()
            self._turns.append(item.account_id)
        jobs.append(item)
        self._ids.add(item.job_id)

    def remove(self, job_id: str) -> Waiting[K] | None:
        """Take one job out wherever it is (cancelled, or given up); None if not queued."""
        if job_id not in self._ids:
            return None
        for account, jobs in self._by_account.items():
            for item in jobs:
                if item.job_id == job_id:
                    jobs.remove(item)
                    self._ids.discard(job_id)
                    if not jobs:
                        self._drop_account(account)
                    return item
        return None  # unreachable while _ids and the deques agree

    def heads(self) -> list[Waiting[K]]:
        """The oldest job of each account, in turn order: the candidates to start a batch."""
        return [self._by_account[a][0] for a in self._turns]

    def take_batch(
        self,
        head: Waiting[K],
        *,
        max_pixels: int,
        max_items: int,
        accepts: Callable[[Waiting[K]], bool] | None = None,
    ) -> list[Waiting[K]]:
        """Remove and return a batch starting with ``head`` (one of ``heads()``).

        Jobs must share ``head.key`` (and pass ``accepts``); they are taken one per account per
        round, starting with the head's account, oldest first within an account. The head is
        always taken, even over ``max_pixels`` (the engine chunks a big job); others only while
        the batch stays within ``max_pixels`` and ``max_items``. The head's account then goes to
        the back of the turn order.
        """
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        if head.job_id not in self._ids or self._by_account[head.account_id][0] is not head:
            raise ValueError(f"job {head.job_id} is not at the head of its account's queue")
        start = self._turns.index(head.account_id)
        order = [self._turns[(start + i) % len(self._turns)] for i in range(len(self._turns))]
        # Per account, the jobs that could join (same key, accepted), oldest first.
        candidates = {
            account: deque(
                item
                for item in self._by_account[account]
                if item.key == head.key and (item is head or accepts is None or accepts(item))
            )
            for account in order
        }
        batch: list[Waiting[K]] = []
        pixels = 0
        full = False
        while not full and any(candidates.values()):
            for account in order:
                queue = candidates[account]
                if not queue:
                    continue
                item = queue[0]
                if batch and (len(batch) >= max_items or pixels + item.pixels > max_pixels):
                    # A smaller job of a later account may still fit; this account is done.
                    candidates[account].clear()
                    full = len(batch) >= max_items
                    if full:
                        break
                    continue
                queue.popleft()
                batch.append(item)
                pixels += item.pixels
        for item in batch:
            self._by_account[item.account_id].remove(item)
            self._ids.discard(item.job_id)
        for account in {item.account_id for item in batch}:
            if not self._by_account[account]:
                self._drop_account(account)
        if head.account_id in self._turns:
            self._turns.remove(head.account_id)
            self._turns.append(head.account_id)
        return batch

    def _drop_account(self, account: int) -> None:
        del self._by_account[account]
        self._turns.remove(account)
