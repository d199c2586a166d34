"""X/Y/Z grids on the whole path (Client -> broker -> Dispatcher -> a Ray CPU worker running the
tiny model): a grid's cells are the images separate jobs with the same settings and seeds make,
each in the gallery with its own infotext; one charge of the cells' sum; the caps refuse."""

from __future__ import annotations

import io
import uuid
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cluster.grid import quote_grid, sheet_png, submit_grid
from core.errors import InsufficientCredits, InvalidRequest, TooManyJobs
from core.grid import expand, ordered_axes
from core.infotext import parse_infotext, read_png_infotext
from core.jobs import JobStatus
from core.settings import Settings
from storage.gallery import list_job_images
from tests.cluster.helpers import Cluster, audit, req, submit, where, who
from tests.cluster.test_pipeline import (  # noqa: F401  (fixtures)
    cluster,
    models,
    models_file,
    settings,
    worker,
)


@pytest.fixture(params=["memory"])
async def broker(request: pytest.FixtureRequest) -> Any:
    from cluster.broker_memory import MemoryBroker

    b = MemoryBroker(claim_idle_ms=1500)
    yield b
    await b.close()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


async def test_grid_cells_equal_separate_runs_with_the_same_seeds(
    cluster: Cluster,  # noqa: F811
) -> None:
    cluster.start()
    alice = who("grid-alice")
    axes = ordered_axes({"x": "seed=11,12", "y": "sr=lighthouse,castle"})
    grid = expand(req(prompt="a lighthouse at dusk", seed=5), axes, max_cells=8)
    quote = await quote_grid(cluster.client, grid, alice)
    assert quote.cost == 4  # one credit a cell: the sum of the cells
    submitted = await submit_grid(cluster.client, quote, alice, lambda _: where(), "grid-1")
    assert submitted.created and len(submitted.job_ids) == 4
    again = await submit_grid(cluster.client, quote, alice, lambda _: where(), "grid-1")
    assert again.job_ids == submitted.job_ids and not again.created
    finals = await cluster.wait_all(list(submitted.job_ids))
    assert all(f.kind.value == "done" for f in finals.values())
    assert audit(cluster, alice).captured == 4  # charged once, the sum of the cells

    for cell, job_id in zip(grid.cells, submitted.job_ids, strict=True):
        alone = await submit(cluster, alice, cell.request)
        single = await cluster.client.wait(alone.job_id)
        [in_grid] = finals[job_id].images
        [by_itself] = single.images
        assert in_grid.seed == by_itself.seed == cell.request.seed
        grid_png = await cluster.client.image_bytes(in_grid)
        alone_png = await cluster.client.image_bytes(by_itself)
        assert np.abs(_pixels(grid_png) - _pixels(alone_png)).max() <= 2
        # Every cell is in the gallery with its own infotext.
        with cluster.session() as s:
            [row] = list_job_images(session=s, job_id=job_id)
        info = parse_infotext(read_png_infotext(grid_png) or "")
        assert info.seed == cell.request.seed and row.prompt.startswith(cell.request.prompt)

    # The sheet: 2 x 2 cells of 64 px plus the label bands.
    sheet = Image.open(io.BytesIO(await sheet_png(cluster.client, axes, submitted.job_ids)))
    assert sheet.width > 2 * 64 and sheet.height > 2 * 64
    text = sheet.info.get("parameters", "")
    assert "Script: X/Y/Z plot, X Type: Seed" in text and 'Y Values: "lighthouse,castle"' in text


async def test_grid_caps_credits_and_slots_refuse_before_any_charge(
    cluster: Cluster, settings: Settings,  # noqa: F811
) -> None:
    bob = who("grid-bob")
    axes = ordered_axes({"x": "steps=4,5,6", "y": "seed=1,2,3"})
    grid = expand(req(), axes, max_cells=64)
    capped = cluster.client.settings.model_copy(
        update={"grid": settings.grid.model_copy(update={"max_credits": 8})}
    )
    client = cluster.client
    client.settings = capped
    try:
        with pytest.raises(InvalidRequest, match="this grid costs 9 credits .9 cells.; a grid may "
                           "cost at most 8"):
            await quote_grid(client, grid, bob)
    finally:
        client.settings = settings
    # A tier with 2 credits a day and one job at a time: the 9 cells cost more than that.
    tight = who("grid-tight")
    client.settings = settings.model_copy(update={"default_tier": "tight"})
    try:
        await client.account(tight)  # first contact: made on the tight tier
    finally:
        client.settings = settings
    with pytest.raises(InsufficientCredits, match="needs 9 credits; you have 2"):
        await quote_grid(client, grid, tight)
    assert audit(cluster, tight).captured == 0

    # The grid counts as one submission against the tier's jobs at a time.
    small = expand(req(), ordered_axes({"x": "seed=1,2"}), max_cells=8)
    quote = await quote_grid(client, small, tight)
    first = await submit_grid(client, quote, tight, lambda _: where(), f"g-{uuid.uuid4()}")
    assert first.created and len(first.job_ids) == 2
    with pytest.raises(TooManyJobs):
        await submit_grid(client, quote, tight, lambda _: where(), f"g-{uuid.uuid4()}")
    statuses = [(await client.job(j)).status for j in first.job_ids]
    assert statuses == [JobStatus.queued, JobStatus.queued]
