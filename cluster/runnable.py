"""Which models a job can use now: what the live workers published through the broker, or,
before any worker has told, what this machine can load. Admission reads the published set once
per request (``published``; requests asking at the same moment share one read) and answers the
default model and the availability from it."""

from __future__ import annotations

import asyncio

from cluster.availability import loadable_models, model_availability
from cluster.broker import Broker, BrokerUnavailable
from cluster.registry import ModelRegistry, how_to_get
from core.errors import ModelUnavailable
from core.request import GenerationRequest

# "Not read yet": ask the broker. (None is an answer: no worker has told, or no broker.)
_ASK = object()
Published = frozenset[str] | None


class RunnableModels:
    """The registry's models as the workers can run them. Safe to call from any task."""

    def __init__(self, models: ModelRegistry, broker: Broker) -> None:
        self.models = models
        self.broker = broker
        # The read in flight, which callers arriving meanwhile share: a burst of admissions
        # (50 people at once) makes one read of the broker, not one each, and no connection
        # per caller. Kept per event loop: a task belongs to the loop that made it.
        self._reading: tuple[asyncio.AbstractEventLoop, asyncio.Task[Published]] | None = None

    async def published(self) -> Published:
        """The union of what the live workers can load, as their dispatchers published it;
        None before any has (start-up) or while the broker does not answer. One read of the
        broker, shared by the callers that ask while it runs (as fresh as a read of their
        own: it began no earlier than one round trip before them)."""
        loop = asyncio.get_running_loop()
        if self._reading is None or self._reading[0] is not loop or self._reading[1].done():
            reading = loop.create_task(self._read_published())
            self._reading = (loop, reading)
            reading.add_done_callback(self._forget)
        # Shielded: a caller cancelled (an interaction given up) leaves the read to the others.
        return await asyncio.shield(self._reading[1])

    def _forget(self, reading: asyncio.Task[Published]) -> None:
        if self._reading is not None and self._reading[1] is reading:
            self._reading = None

    async def _read_published(self) -> Published:
        try:
            by_worker = await self.broker.registry.worker_models()
        except BrokerUnavailable:
            return None
        return frozenset().union(*by_worker.values()) if by_worker else None

    async def available(self) -> list[str]:
        """The registry's models a job can use now, in registry order: those some worker can
        load, or, before any worker has told, those this machine can load. What front ends
        offer and list (``/help``)."""
        published = await self.published()
        if published is not None:
            return [n for n in self.models.names() if n in published]
        return await asyncio.to_thread(loadable_models, self.models)

    async def default(self, published: Published | object = _ASK) -> str:
        """The model a request naming none gets: the registry's default, or its fallback (the
        demo model) when no worker can load the default and some can load the fallback.
        ``published``: the set already read for this request (no second round trip)."""
        default, fallback = self.models.default, self.models.fallback
        if fallback is None or fallback == default:
            return default
        known = await self.published() if published is _ASK else published
        if isinstance(known, frozenset):
            return fallback if default not in known and fallback in known else default

        def here(name: str) -> bool:
            return model_availability(self.models.get(name)).loadable

        if await asyncio.to_thread(here, default) or not await asyncio.to_thread(here, fallback):
            return default
        return fallback

    async def with_default(
        self, request: GenerationRequest, published: Published | object = _ASK
    ) -> GenerationRequest:
        """``request`` with its model named (``default`` when it names none)."""
        if request.model is not None:
            return request
        return request.model_copy(update={"model": await self.default(published)})

    async def check(self, name: str | None, published: Published | object = _ASK) -> None:
        """Raise ModelUnavailable, with one line on how to get it, when no worker can load
        model ``name`` (the default when None); InvalidRequest for an unknown name."""
        spec = self.models.get(name)
        known = await self.published() if published is _ASK else published
        if isinstance(known, frozenset) and spec.name in known:
            return
        here = await asyncio.to_thread(model_availability, spec)
        if not isinstance(known, frozenset):  # no worker has told: this machine stands for it
            if here.loadable:
                return
            raise ModelUnavailable(
                f"model '{spec.name}' is not available: {here.why}. To get it: {here.how}"
            )
        why = f" ({here.why})" if here.why else ""
        raise ModelUnavailable(
            f"model '{spec.name}' is not available on any worker{why}. "
            f"To get it: {here.how or how_to_get(spec)}"
        )
