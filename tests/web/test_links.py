"""Signing in with a bot's link, and the attacks on it: expired, tampered, other purposes,
forged or stale cookies, other people's images, open redirects."""

from __future__ import annotations

from datetime import timedelta

from core.signing import sign
from tests.web.conftest import Web
from tests.web.helpers import add_job, gallery_link, make_person
from web.session import COOKIE, SESSION_PURPOSE

DAY = timedelta(days=1)


async def _sign_in(web: Web, account_id: int, ttl: timedelta = DAY) -> str:
    link = gallery_link(web.key, account_id, now=web.clock(), ttl=ttl)
    reply = await web.http.get(link)
    assert reply.status_code == 303, reply.text
    return reply.headers["set-cookie"]


async def test_a_link_signs_in_with_a_safe_cookie_and_a_short_url(web: Web) -> None:
    me = make_person(web.sessions)
    add_job(web.sessions, web.blobs, me, "a lighthouse at dusk")
    link = gallery_link(web.key, me.account_id, now=web.clock(), ttl=DAY)
    reply = await web.http.get(link)
    assert reply.status_code == 303
    assert reply.headers["location"] == "/gallery"
    cookie = reply.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
    assert "max-age=43200" in cookie  # 12 hours: less than the link's day
    assert reply.headers["referrer-policy"] == "no-referrer"
    page = await web.http.get("/gallery")  # the cookie is all it needs from now on
    assert page.status_code == 200 and "a lighthouse at dusk" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


async def test_the_session_never_outlives_its_link(web: Web) -> None:
    me = make_person(web.sessions)
    cookie = await _sign_in(web, me.account_id, ttl=timedelta(minutes=10))
    max_age = int(cookie.lower().split("max-age=")[1].split(";")[0])
    assert 590 <= max_age <= 600
    web.clock.at += timedelta(minutes=11)
    reply = await web.http.get("/gallery")
    assert reply.status_code == 401 and "ended" in reply.text


async def test_an_expired_link_is_refused_and_sets_nothing(web: Web) -> None:
    me = make_person(web.sessions)
    link = gallery_link(web.key, me.account_id, now=web.clock() - 2 * DAY, ttl=DAY)
    reply = await web.http.get(link)
    assert reply.status_code == 403 and "expired" in reply.text
    assert "set-cookie" not in reply.headers
    # The page says only that: nothing about whose link it was.
    assert "<p>this link has expired; ask the bot for a new one</p>" in reply.text
    assert me.user_id not in reply.text and "account" not in reply.text
    assert (await web.http.get("/gallery")).status_code == 401


async def test_a_tampered_link_is_refused(web: Web) -> None:
    me, other = make_person(web.sessions), make_person(web.sessions)
    link = gallery_link(web.key, me.account_id, now=web.clock(), ttl=DAY)
    token = link.removeprefix("/g/")
    body, mac = token.split(".")
    # Someone else's account id under my MAC; a flipped MAC; a truncated token; garbage.
    theirs = gallery_link(web.key, other.account_id, now=web.clock(), ttl=DAY)
    forged = theirs.removeprefix("/g/").split(".")[0] + "." + mac
    flipped = body + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
    for bad in (forged, flipped, body, "x.y", "%2e%2e%2f" * 3):
        reply = await web.http.get(f"/g/{bad}")
        assert reply.status_code in (403, 404), bad
        assert "set-cookie" not in reply.headers
    signed_elsewhere = sign(b"another-key" * 4, subject=str(me.account_id), purpose="gallery",
                            now=web.clock(), ttl=DAY)
    assert (await web.http.get(f"/g/{signed_elsewhere}")).status_code == 403


async def test_tokens_of_other_purposes_do_not_cross(web: Web) -> None:
    me = make_person(web.sessions)
    # A session cookie's value is not a link...
    session_value = sign(web.key, subject=str(me.account_id), purpose=SESSION_PURPOSE,
                         now=web.clock(), ttl=DAY)
    assert (await web.http.get(f"/g/{session_value}")).status_code == 403
    # ...and a link token is not a session cookie.
    link_token = gallery_link(web.key, me.account_id, now=web.clock(), ttl=DAY)[3:]
    web.http.cookies.set(COOKIE, link_token)
    assert (await web.http.get("/gallery")).status_code == 401


async def test_a_forged_cookie_is_refused(web: Web) -> None:
    me, other = make_person(web.sessions), make_person(web.sessions)
    add_job(web.sessions, web.blobs, other, "their secret picture")
    await _sign_in(web, me.account_id)
    mine = web.http.cookies[COOKIE]
    body, mac = mine.split(".")
    theirs = sign(b"z" * 48, subject=str(other.account_id), purpose=SESSION_PURPOSE,
                  now=web.clock(), ttl=DAY)
    web.http.cookies.set(COOKIE, theirs.split(".")[0] + "." + mac)
    reply = await web.http.get("/gallery")
    assert reply.status_code == 401 and "their secret picture" not in reply.text


async def test_no_open_redirect(web: Web) -> None:
    me = make_person(web.sessions)
    link = gallery_link(web.key, me.account_id, now=web.clock(), ttl=DAY)
    for query in ("?next=https://evil.example/", "?redirect=//evil.example",
                  "?url=%2F%2Fevil.example"):
        reply = await web.http.get(link + query)
        assert reply.status_code == 303 and reply.headers["location"] == "/gallery"
    home = await web.http.get("/", headers={"host": "evil.example"})
    assert home.headers["location"] == "/gallery"  # relative: never to a host the request names


async def test_other_peoples_images_are_not_found(web: Web) -> None:
    me, other = make_person(web.sessions), make_person(web.sessions)
    mine = add_job(web.sessions, web.blobs, me, "my cat")[0]
    theirs = add_job(web.sessions, web.blobs, other, "their dog")[0]
    await _sign_in(web, me.account_id)
    page = await web.http.get(f"/gallery/image/{mine.id}")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    missing = 10**9
    for path in (f"/gallery/image/{theirs.id}", f"/gallery/thumb/{theirs.id}.webp",
                 f"/gallery/image/{theirs.id}.png", f"/gallery/zip?ids={theirs.id}"):
        reply = await web.http.get(path)
        gone = await web.http.get(path.replace(str(theirs.id), str(missing)))
        assert reply.status_code == 404 == gone.status_code, path
        assert "their dog" not in reply.text
        # Someone else's image and no image at all look the same: nothing to learn.
        assert reply.text.replace(str(theirs.id), "N") == gone.text.replace(str(missing), "N")
    for action in ("delete", "make"):
        reply = await web.http.post(f"/gallery/image/{theirs.id}/{action}", data={"csrf": csrf})
        assert reply.status_code == 404, action
    assert web.blobs.exists(theirs.blob_key)
    web.http.cookies.clear()
    await _sign_in(web, other.account_id)
    assert "their dog" in (await web.http.get("/gallery")).text  # still there for its owner


async def test_ids_in_paths_cannot_reach_files(web: Web) -> None:
    me = make_person(web.sessions)
    await _sign_in(web, me.account_id)
    for path in ("/gallery/thumb/..%2F..%2Fsigning.key.webp", "/gallery/image/-1.png",
                 "/static/..%2F..%2Fdata%2Fsigning.key", "/gallery/image/1e3.png"):
        reply = await web.http.get(path)
        assert reply.status_code in (404, 422), path
        assert web.key.decode() not in reply.text


async def test_the_home_page_says_how_to_get_a_link(web: Web) -> None:
    home = await web.http.get("/")
    assert home.status_code == 200, home.text
    assert "/gallery" in home.text and "atelier gallery link" in home.text
    assert "valid 7 days" in home.text  # ATELIER_GALLERY_LINK_TTL_S, in words
    assert "see / for how to get one" in (await web.http.get("/gallery")).text
    me = make_person(web.sessions)
    await web.http.get(gallery_link(web.key, me.account_id, now=web.clock(), ttl=DAY))
    signed_in = await web.http.get("/")
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/gallery"
