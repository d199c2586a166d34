"""The real ``webuiapi`` client (PyPI) drives /sdapi/v1 on a real uvicorn server: txt2img,
img2img, progress while running, interrupt, options, sd-models, png-info; credits once."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import requests
import webuiapi
from PIL import Image, ImageDraw

from core.jobs import JobStatus
from core.request import GenerationRequest, JobKind
from tests.web.api.conftest import WebStack


async def _api(web: WebStack, key: str) -> webuiapi.WebUIApi:
    # --api-auth style: any user name, the API key as the password. Built in a thread: the
    # constructor already calls the server, which answers from this test's event loop.
    return await asyncio.to_thread(
        webuiapi.WebUIApi, baseurl=f"{web.url}/sdapi/v1", username="me", password=key
    )


async def test_txt2img_carries_the_parameters_and_charges_once(web: WebStack) -> None:
    api = await _api(web, web.new_key("101"))
    before = await web.balance("101")
    result = await asyncio.to_thread(
        api.txt2img, prompt="a red fox", negative_prompt="blurry", seed=1234, steps=3,
        cfg_scale=6, width=64, height=96, batch_size=2, sampler_name="Euler",
    )
    assert len(result.images) == 2
    assert [im.size for im in result.images] == [(64, 96), (64, 96)]
    assert result.info["all_seeds"] == [1234, 1235]
    assert (result.info["steps"], result.info["cfg_scale"], result.info["sd_model_name"]) == (
        3, 6, "tiny")
    assert result.parameters["prompt"] == "a red fox" and result.parameters["seed"] == 1234
    text = result.images[1].info["parameters"]
    # The negative is the caller's, plus the SFW guard's terms (API keys are not NSFW).
    assert text.startswith("a red fox\nNegative prompt: blurry")
    for part in ("Steps: 3", "Sampler: Euler,", "CFG scale: 6", "Seed: 1235", "Size: 64x96"):
        assert part in text
    (job,) = web.jobs()
    assert job.status is JobStatus.succeeded and job.delivered_at is not None
    assert await web.balance("101") == before - job.cost and job.cost == 2
    # png-info reads it back from the PNG the client holds.
    info = await asyncio.to_thread(api.png_info, result.images[0])
    assert "Seed: 1234" in info.info and info.json["parameters"]["Seed"] == "1234"
    assert info.json["parameters"]["Prompt"] == "a red fox"


async def test_img2img_with_a_mask_is_an_inpaint_job(web: WebStack) -> None:
    api = await _api(web, web.new_key("102"))
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = await asyncio.to_thread(
        api.img2img, images=[init], mask_image=mask, prompt="a blue square",
        denoising_strength=0.5, steps=4, width=64, height=64, seed=5,
    )
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["denoising_strength"] == 0.5 and result.info["seed"] == 5
    assert result.parameters["init_images"] is None  # include_init_images=False
    (job,) = web.jobs()
    request = GenerationRequest.model_validate_json(job.request_json)
    assert request.kind is JobKind.inpaint and request.strength == 0.5
    plain = await asyncio.to_thread(
        api.img2img, images=[init], prompt="a red square", denoising_strength=0.75, steps=4,
        width=64, height=64,
    )
    assert len(plain.images) == 1 and "Denoising strength: 0.75" in plain.images[0].info[
        "parameters"]


async def test_models_options_and_lists(web: WebStack) -> None:
    api = await _api(web, web.new_key("103"))
    titles = [m["title"] for m in await asyncio.to_thread(api.get_sd_models)]
    assert "tiny" in titles and "tiny-xl" in titles
    assert await asyncio.to_thread(api.util_get_current_model) == "tiny"
    await asyncio.to_thread(api.set_options, {"sd_model_checkpoint": "tiny-xl"})
    assert (await asyncio.to_thread(api.get_options))["sd_model_checkpoint"] == "tiny-xl"
    bad = await asyncio.to_thread(
        requests.post, f"{web.url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"},
        auth=api.session.auth,
    )
    assert bad.status_code == 422 and bad.json()["field"] == "sd_model_checkpoint"
    # An override for one call wins over the key's choice.
    result = await asyncio.to_thread(
        api.txt2img, prompt="a cat", steps=2, width=64, height=64,
        override_settings={"sd_model_checkpoint": "tiny"},
    )
    assert result.info["sd_model_name"] == "tiny"
    await asyncio.to_thread(api.util_set_model, "tiny")
    assert await asyncio.to_thread(api.util_get_current_model) == "tiny"

    samplers = await asyncio.to_thread(api.util_get_sampler_names)
    assert "Euler a" in samplers and "DPM++ 2M Karras" in samplers
    assert await asyncio.to_thread(api.util_get_scheduler_names) == ["automatic", "karras"]
    assert [u["name"] for u in await asyncio.to_thread(api.get_upscalers)] == ["None"]
    styles = await asyncio.to_thread(api.get_prompt_styles)
    assert any(s["name"] == "watercolor" for s in styles)
    styled = await asyncio.to_thread(
        api.txt2img, prompt="a boat", styles=["watercolor"], steps=2, width=64, height=64
    )
    assert styled.info["styles"] == ["watercolor"]
    assert "Styles: watercolor" in styled.images[0].info["parameters"]


async def test_a_controlnet_unit_from_webuiapi_steers_the_picture(web: WebStack) -> None:
    """What webuiapi's ControlNetUnit sends (the extension's shape) runs on the worker."""
    api = await _api(web, web.new_key("107"))
    models = await asyncio.to_thread(
        requests.get, f"{web.url}/controlnet/model_list", auth=api.session.auth
    )
    # The operator's, and the demo model's own from the package.
    assert sorted(models.json()["model_list"]) == ["demo-canny", "edges"]
    modules = await asyncio.to_thread(
        requests.get, f"{web.url}/controlnet/module_list", auth=api.session.auth
    )
    assert "canny" in modules.json()["module_list"]
    left, right = (Image.new("RGB", (64, 64), "black") for _ in range(2))
    ImageDraw.Draw(left).ellipse((4, 20, 28, 44), fill="white")
    ImageDraw.Draw(right).ellipse((36, 20, 60, 44), fill="white")
    same = {"prompt": "a red fox", "steps": 2, "width": 64, "height": 64, "seed": 9,
            "sampler_name": "Euler"}
    plain = await asyncio.to_thread(api.txt2img, **same)
    units = [
        webuiapi.ControlNetUnit(image=img, module="canny", model="edges [0123abcd]",
                                threshold_a=100, threshold_b=200)
        for img in (left, right)
    ]
    a = await asyncio.to_thread(api.txt2img, controlnet_units=[units[0]], **same)
    b = await asyncio.to_thread(api.txt2img, controlnet_units=[units[1]], **same)
    assert len({plain.images[0].tobytes(), a.images[0].tobytes(), b.images[0].tobytes()}) == 3
    assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 1' in a.info["infotexts"][0]
    unit = webuiapi.ControlNetUnit(image=left, module="canny", model="edgs").to_dict()
    bad = await asyncio.to_thread(
        requests.post, f"{web.url}/sdapi/v1/txt2img", auth=api.session.auth,
        json={**same, "alwayson_scripts": {"ControlNet": {"args": [unit]}}},
    )
    assert bad.status_code == 422
    assert "unknown ControlNet 'edgs' (did you mean 'edges'?)" in bad.text


async def test_lora_in_the_prompt_is_listed_applied_and_reported(web: WebStack) -> None:
    api = await _api(web, web.new_key("106"))
    listed = await asyncio.to_thread(
        requests.get, f"{web.url}/sdapi/v1/loras", auth=api.session.auth
    )
    assert [(x["name"], x["metadata"]["family"]) for x in listed.json()] == [
        ("outline", "sd15"), ("ink", "sd15")]  # the packaged demo LoRA, then the operator's
    assert listed.json()[0]["metadata"]["models"] == ["demo"]
    same = {"steps": 2, "width": 64, "height": 64, "seed": 9, "sampler_name": "Euler"}
    plain = await asyncio.to_thread(api.txt2img, prompt="a red fox", **same)
    inked = await asyncio.to_thread(api.txt2img, prompt="a red fox <lora:ink:0.8>", **same)
    assert inked.images[0].info["parameters"].startswith("a red fox <lora:ink:0.8>\n")
    assert inked.images[0].tobytes() != plain.images[0].tobytes()
    bad = await asyncio.to_thread(
        requests.post, f"{web.url}/sdapi/v1/txt2img", auth=api.session.auth,
        json={"prompt": "a red fox <lora:inc:1>", "steps": 2, "width": 64, "height": 64},
    )
    assert bad.status_code == 422 and "unknown LoRA 'inc' (did you mean 'ink'?)" in bad.text
    # An embedding is listed by its token and applies where the token is used.
    listed = await asyncio.to_thread(
        requests.get, f"{web.url}/sdapi/v1/embeddings", auth=api.session.auth
    )
    assert list(listed.json()["loaded"]) == ["easyneg"]
    embedded = await asyncio.to_thread(
        api.txt2img, prompt="a red fox", negative_prompt="easyneg", **same
    )
    assert embedded.images[0].tobytes() != plain.images[0].tobytes()
    assert "Negative prompt: easyneg" in embedded.images[0].info["parameters"]


async def _poll_progress(api: webuiapi.WebUIApi, until: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(api.get_progress)
        if until(seen):
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"progress never matched; last {seen}")


async def test_progress_while_running_then_interrupt_refunds(web: WebStack) -> None:
    api = await _api(web, web.new_key("104"))
    before = await web.balance("104")
    idle = await asyncio.to_thread(api.get_progress)
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    call = asyncio.create_task(asyncio.to_thread(
        api.txt2img, prompt="a slow sunrise", steps=50, width=512, height=512, seed=9
    ))
    running = await _poll_progress(api, lambda p: p["state"]["sampling_step"] > 0)
    assert running["state"]["sampling_steps"] == 50 and 0 < running["progress"] < 1
    assert running["eta_relative"] > 0 and running["current_image"] is None
    await asyncio.to_thread(api.interrupt)
    result = await asyncio.wait_for(call, 60)
    assert result.images == []
    (job,) = web.jobs()
    assert job.status is JobStatus.cancelled
    assert await web.balance("104") == before  # refunded
    after = await asyncio.to_thread(api.get_progress)
    assert after["state"]["job_count"] == 0


async def test_unsupported_fields_get_422_naming_them_and_cost_nothing(web: WebStack) -> None:
    api = await _api(web, web.new_key("105"))
    before = await web.balance("105")
    for fields, field in (
        ({"enable_hr": True}, "enable_hr"),
        ({"width": 100}, "width"),
        ({"sampler_name": "Heun"}, "sampler_name"),
        ({"batch_size": 3, "n_iter": 2}, "batch_size"),
        ({"steps": 51}, "steps"),  # the model's own limit, checked by the client
        ({"styles": ["no-such-style"]}, "styles"),
    ):
        try:
            await asyncio.to_thread(api.txt2img, **{"prompt": "x", "steps": 2, **fields})
        except RuntimeError as exc:
            status, body = exc.args
            assert status == 422 and json.loads(body)["field"] == field
        else:
            raise AssertionError(f"{fields} was accepted")
    assert web.jobs() == [] and await web.balance("105") == before


async def test_wrong_missing_and_revoked_keys_get_401(web: WebStack) -> None:
    key = web.new_key("106")
    url = f"{web.url}/sdapi/v1/sd-models"
    ok = await asyncio.to_thread(requests.get, url, auth=("any", key))
    assert ok.status_code == 200
    wrong = await asyncio.to_thread(requests.get, url, auth=("any", key[:-2] + "xx"))
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Basic")
    assert key not in wrong.text
    none = await asyncio.to_thread(requests.get, url)
    assert none.status_code == 401 and "atelier apikey create" in none.json()["detail"]
    web.revoke(key)
    revoked = await asyncio.to_thread(requests.get, url, auth=("any", key))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
    for path in ("txt2img", "img2img", "options", "png-info"):
        r = await asyncio.to_thread(requests.post, f"{web.url}/sdapi/v1/{path}", json={})
        assert r.status_code == 401, path


async def test_what_a_call_gets_follows_the_model_and_is_reported(web: WebStack) -> None:
    api = await _api(web, web.new_key("108"))
    # What the current model is, is what a call without an override gets.
    current = await asyncio.to_thread(api.util_get_current_model)
    assert current == await web.client.default_model()
    # Only what some worker can load is listed (no hub repo here: HF_HUB_OFFLINE in tests).
    titles = [m["title"] for m in await asyncio.to_thread(api.get_sd_models)]
    assert current in titles and "sd15" not in titles, titles
    spec = web.client.models.get(current)
    # A bare call: the model's own size, steps and sampler.
    bare = await asyncio.to_thread(
        requests.post, f"{web.url}/sdapi/v1/txt2img", json={"prompt": "a fox", "seed": 4},
        auth=api.session.auth, timeout=120,
    )
    assert bare.status_code == 200, bare.text
    info = json.loads(bare.json()["info"])
    assert (info["width"], info["height"], info["steps"], info["sampler_name"]) == (
        spec.default_width, spec.default_height, spec.default_steps, spec.scheduler)
    # A size past what the model draws is scaled down to fit, keeping its shape (A1111 clients
    # cannot ask a model's limits); info says what was used.
    big = await asyncio.to_thread(
        api.txt2img, prompt="a fox", seed=5, steps=2,
        width=spec.max_width * 2, height=spec.max_width, negative_prompt="blurry",
    )
    assert big.images[0].size == (spec.max_width, spec.max_width // 2)
    assert (big.info["width"], big.info["height"]) == big.images[0].size
    # The negative prompt reported is the one used: the caller's plus the SFW guard's terms.
    assert big.info["negative_prompt"] == "blurry, nsfw, nude", big.info["negative_prompt"]
    assert big.info["all_negative_prompts"] == [big.info["negative_prompt"]]
    assert f"Negative prompt: {big.info['negative_prompt']}" in big.images[0].info["parameters"]


async def test_xyz_plot_script_returns_the_grid_then_the_cells(web: WebStack) -> None:
    api = await _api(web, web.new_key("131"))
    before = await web.balance("131")
    # A1111 1.6+: [x_type, x_values, x_dropdown, y_type, ...]; 7 = Prompt S/R, 1 = Seed.
    args = [7, "fox,cat", [], 1, "11,12", [], 0, "", [], True, True, False, False, 0, False]
    result = await asyncio.to_thread(
        api.txt2img, prompt="a red fox", steps=2, width=64, height=64,
        script_name="x/y/z plot", script_args=args,
    )
    assert len(result.images) == 1 + 4  # the grid, then each cell (include_lone_images)
    sheet = result.images[0]
    assert sheet.width > 2 * 64 and sheet.height > 2 * 64
    assert "Script: X/Y/Z plot, X Type: Prompt S/R" in sheet.info["parameters"]
    assert [im.size for im in result.images[1:]] == [(64, 64)] * 4
    assert result.info["all_seeds"] == [11, 11, 12, 12]
    cells = [im.info["parameters"].split("\n")[0] for im in result.images[1:]]
    assert cells == ["a red fox", "a red cat", "a red fox", "a red cat"]
    jobs = web.jobs()
    assert len(jobs) == 4 and all(j.status is JobStatus.succeeded for j in jobs)
    assert await web.balance("131") == before - sum(j.cost for j in jobs)
    # An axis Atelier cannot vary is refused by name, for nothing.
    for bad, words in (([5, "1,2"], "'Hires steps' is not supported"),
                       ([7, "dog,cat"], "'dog' is not in the prompt")):
        try:
            await asyncio.to_thread(api.txt2img, prompt="a red fox", steps=2,
                                    script_name="x/y/z plot", script_args=bad)
        except RuntimeError as exc:
            status, body = exc.args
            assert status == 422 and json.loads(body)["field"] == "script_args"
            assert words in json.loads(body)["detail"]
        else:
            raise AssertionError(f"{bad} was accepted")
    assert len(web.jobs()) == 4
