"""Every line the bots say, in plain text (no markup: it reads the same on Telegram and Discord).
Errors become one line: what went wrong, what to do about it, and the credits left."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from core.errors import (
    AccountBlocked,
    AtelierError,
    Conflict,
    ContentBlocked,
    Forbidden,
    ImageRejected,
    InsufficientCredits,
    InvalidRequest,
    NotFound,
    RateLimited,
    UnreadableImage,
)
from core.flags import flags_help
from core.jobs import JobStatus
from core.request import GenerationRequest, JobKind
from storage.jobs import JobRead
from storage.ledger import Balance

CAPTION_LIMIT = 1024  # Telegram's caption limit; Discord's message limit is larger
PROMPT_PREVIEW = 200

HELP = (
    "Flags: {flags}; --png sends the original PNG file.\n"
    "Under each result: reroll, V1-V4 variations, U1-U4 upscales, another style, and 🖌 Vary "
    "(Region): paint the part to change in the gallery."
)
PHOTO_TIP = "Send a photo with a caption to redraw it (add --strength 0.5 to keep more of it)."
UNSUPPORTED = (
    "I make images from text: send /imagine <prompt>, or a photo with a caption describing "
    "what to make of it. {what} is not something I can use."
)
PHOTO_NEEDS_CAPTION = (
    "Add a caption to the photo saying what to make of it, e.g. 'as a watercolor painting "
    "--strength 0.6'."
)
ONE_PHOTO_AT_A_TIME = (
    "I redraw one photo at a time: the one whose caption says what to make of it (e.g. 'as a "
    "watercolor --strength 0.6'). Photos of an album without a caption are left as they are."
)
UNEXPECTED = "Something went wrong on our side; it has been logged. Please try again in a minute."
NOT_YOURS = "These buttons belong to the person who asked for the image; send your own /imagine."
EXPIRED_BUTTON = "This button no longer works; send a new /imagine."
ADMINS_ONLY = "Only the group's admins can change its settings."
PRIVATE_ONLY = "For your privacy, use {command} in a private chat with me."
NOTHING_TO_CANCEL = "You have no queued or running job to cancel."
IMAGINE_USAGE = "Tell me what to make, e.g. /imagine a lighthouse at dusk --ar 16:9"
GRID_USAGE = (
    "Compare settings side by side, e.g. /grid a lighthouse --x cfg=3,7,11 --y steps=10,20 "
    "--z style=none,watercolor. Axes: seed, steps, cfg, sampler, size (512x768), style, "
    "model, lora:NAME (weights), sr (prompt search/replace: the first value is the word "
    "to replace). Up to 3 axes; the price is the sum of the cells."
)

_HINTS: tuple[tuple[type[AtelierError], str], ...] = (
    (UnreadableImage, "that file is not a readable image; send a PNG, JPEG or WebP photo"),
    (ImageRejected, "send a smaller PNG, JPEG or WebP photo"),
    (InvalidRequest, "fix that and send it again (/help lists the flags)"),
    (ContentBlocked, "rephrase the prompt; nothing was charged"),
    (InsufficientCredits, "wait for the daily reset or buy a pack (/buy)"),
    (RateLimited, "wait a moment and try again"),
    (AccountBlocked, "ask the operator if you think this is a mistake"),
    (Forbidden, "only the person who asked can do that"),
    (NotFound, "it may have been deleted; check /history"),
    (Conflict, "nothing was changed"),
)


def help_text(
    commands: Sequence[tuple[str, str]], models: Sequence[str] = (), *, tips: Sequence[str] = ()
) -> str:
    """The help: every command of the platform's menu as registered there (name, what it
    does), so /help cannot leave one out; the platform's ``tips``; ``models`` (the ones
    available now: ``Client.available_models``)."""
    lines = ["How to use me:", *(f"/{name} - {what}" for name, what in commands), *tips]
    text = "\n".join(lines) + "\n\n" + HELP.format(flags=flags_help())
    return text + (f"\nModels (--model): {', '.join(models)}." if models else "")


def steps_setting(steps: int | None, model_default: int) -> str:
    """The steps a plain /imagine runs: the person's own, or the default model's, said so."""
    return str(steps) if steps is not None else f"{model_default} (model default)"


def welcome(name: str, balance: Balance, now: datetime, help_: str) -> str:
    """The first words to a person: their credits, then ``help_`` (the platform's /help)."""
    return (
        f"Hi {name}! I turn your words into images.\n"
        f"You have {describe_balance(balance, now)}.\n\n" + help_
    )


def until(when: datetime, now: datetime) -> str:
    """``5 h 12 min``, rounded up to the minute."""
    minutes = max(1, math.ceil((when - now).total_seconds() / 60))
    hours, mins = divmod(minutes, 60)
    if hours and mins:
        return f"{hours} h {mins} min"
    return f"{hours} h" if hours else f"{mins} min"


def describe_balance(balance: Balance, now: datetime) -> str:
    """``2 left today (resets in 5 h 12 min) and 5 in packs``."""
    parts = [f"{balance.daily_left} left today (resets in {until(balance.next_reset, now)})"]
    in_packs = sum(p.amount for p in balance.packs)
    if in_packs:
        parts.append(f"{in_packs} in packs")
    return " and ".join(parts)


# After a button press there is no message to fix and send again.
_BUTTON_HINTS: tuple[tuple[type[AtelierError], str], ...] = (
    (InvalidRequest, "this button cannot do that; nothing was charged"),
)


def hint_for(exc: AtelierError, *, button: bool = False) -> str:
    """What the person can do about ``exc``; ``button``: it came from a button press."""
    for kind, hint in (_BUTTON_HINTS if button else ()) + _HINTS:
        if isinstance(exc, kind):
            return hint
    return "please try again"


def error_line(exc: AtelierError, credits_left: int | None = None, *, button: bool = False) -> str:
    """``⚠️ <what is wrong> — <what to do>. Credits left: N`` on one line (``button``: the
    advice fits a refusal of a button press)."""
    line = f"⚠️ {_sentence(exc.message)} - {hint_for(exc, button=button)}."
    if credits_left is not None:
        line += f" Credits left: {credits_left}."
    return line


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:]


def prompt_preview(prompt: str, limit: int = PROMPT_PREVIEW) -> str:
    prompt = " ".join(prompt.split())
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


def queued(prompt: str, position: int | None) -> str:
    where = f"position {position} in the queue" if position else "in the queue"
    return f"⏳ {prompt_preview(prompt)}\nQueued, {where}."


def grid_queued(prompt: str, shape: str, cells: int, cost: int) -> str:
    plural = "credit" if cost == 1 else "credits"
    return f"⏳ {prompt_preview(prompt)}\n{shape}: {cells} cells queued ({cost} {plural})."


def grid_progress(prompt: str, shape: str, done: int, cells: int) -> str:
    return f"🎨 {prompt_preview(prompt)}\n{shape}: {done}/{cells} cells done…"


def grid_finished(prompt: str, shape: str, cells: int, missing: int) -> str:
    line = f"✅ {prompt_preview(prompt)}\n{shape}: {cells} cells, every one in your /gallery."
    if missing:
        line += f" {missing} failed or were cancelled (grey on the sheet; refunded)."
    return line


def grid_cancelled(prompt: str, shape: str, cells: int, credits_left: int | None) -> str:
    line = (f"🚫 {prompt_preview(prompt)}\n{shape}: cancelled, none of its {cells} cells made; "
            "the credits were refunded.")
    if credits_left is not None:
        line += f" Credits left: {credits_left}."
    return line


def grid_cancel_asked(cancelled: int, stopping: int, finished: int) -> str:
    def cells(n: int) -> str:
        return f"{n} cell" if n == 1 else f"{n} cells"

    parts = []
    if cancelled:
        parts.append(f"{cells(cancelled)} cancelled before starting and refunded")
    if stopping:
        parts.append(f"{cells(stopping)} running told to stop (refunded unless done first)")
    if finished:
        parts.append(f"{cells(finished)} had already ended")
    return "🚫 " + "; ".join(parts) + "."


def rendering(prompt: str, step: int | None = None, total: int | None = None) -> str:
    progress = ""
    if step is not None and total:
        filled = round(10 * min(step, total) / total)
        progress = f" {'▰' * filled}{'▱' * (10 - filled)} step {step}/{total}"
    return f"🎨 {prompt_preview(prompt)}\nRendering…{progress}"


def finished(prompt: str, images: int) -> str:
    plural = "image" if images == 1 else "images"
    return f"✅ {prompt_preview(prompt)}\nDone: {images} {plural}."


def failed(reason: str | None, credits_left: int | None) -> str:
    line = f"❌ The job failed: {_sentence(reason or 'unknown error')}. Nothing was charged."
    if credits_left is not None:
        line += f" Credits left: {credits_left}."
    return line


def cancelled(credits_left: int | None) -> str:
    line = "🚫 Cancelled; the credits were refunded."
    if credits_left is not None:
        line += f" Credits left: {credits_left}."
    return line


def preview(request: GenerationRequest, cost: int, credits_left: int | None) -> str:
    """What plain text would make, and its price, above an Imagine button."""
    details = [f"{request.width}x{request.height}", f"{request.steps} steps"]
    if request.count > 1:
        details.insert(0, f"{request.count} images")
    if request.styles:
        details.append(f"style {', '.join(request.styles)}")
    price = f"{cost} credit{'s' if cost != 1 else ''}"
    left = f" (you have {credits_left})" if credits_left is not None else ""
    return (
        f"✨ {prompt_preview(request.prompt)}\n{', '.join(details)}: {price}{left}.\n"
        "Press Imagine to make it, or use /imagine with flags to change it."
    )


def accepted(action: str, cost: int) -> str:
    return f"{action}… ({cost} credit{'s' if cost != 1 else ''})"


def caption(request: GenerationRequest, seed: int, style: str | None) -> str:
    """The caption under a result: prompt, then what reproduces it."""
    what = {JobKind.upscale: "Upscaled", JobKind.variation: "Variation"}.get(request.kind, "")
    details = [f"seed {seed}", f"{request.width}x{request.height}", f"{request.steps} steps"]
    if style:
        details.insert(0, f"style {style}")
    head = f"{what}: " if what else ""
    text = f"{head}{prompt_preview(request.prompt, 700)}\n{', '.join(details)}"
    return text[:CAPTION_LIMIT]


def control_caption(request: GenerationRequest) -> str:
    """The caption under a ControlNet result's control map (the preview before the images)."""
    unit = request.control
    what = {"canny": "the edges of your picture", "scribble": "the lines of your drawing"}.get(
        unit.preprocessor if unit is not None and unit.preprocessor else "none",
        "your picture as it is")
    name = f" ({unit.controlnet})" if unit is not None and unit.controlnet else ""
    return f"Control map{name}: the images below follow {what}."


def maybe_posted(numbers: list[int]) -> str:
    """Said instead of an image whose earlier upload may have arrived: the bot restarted
    between sending it and hearing back, and posting it again could show it twice."""
    which = "Your image" if numbers == [1] else "Images " + ", ".join(map(str, numbers))
    return (f"{which}: I restarted while sending, so it may be just above. If it is not, "
            "open it from your gallery (/gallery): it is saved there.")


def no_post_here(place: str, missing: list[str], link: str) -> str:
    """Why the results went by private message (or nowhere): the bot may not post in
    ``place`` (as the platform writes it, e.g. ``<#123>``), lacking ``missing``."""
    return (f"I could not post your images in {place}: I lack {' and '.join(missing)} there. "
            f"Ask a server admin to allow it; meanwhile your images are in your gallery: {link}")


def album_buttons_note(images: int) -> str:
    return f"Your {images} images: V = variation, U = upscale (numbered left to right)."


def credits_text(balance: Balance, now: datetime) -> str:
    reset = balance.next_reset
    lines = [
        f"Today: {balance.daily_left} of {balance.daily_allowance} daily credits left.",
        f"Next reset: {reset:%Y-%m-%d %H:%M} UTC (in {until(reset, now)}).",
    ]
    if balance.packs:
        lines.append("Packs:")
        for pack in balance.packs:
            expiry = f"expires {pack.expires_at:%Y-%m-%d}" if pack.expires_at else "no expiry"
            lines.append(f"  {pack.amount} credits, {expiry}")
    else:
        lines.append("No credit packs.")
    lines.append(f"Total you can spend now: {balance.total}.")
    lines.append("A 512x512 image with up to 30 steps costs 1 credit.")
    return "\n".join(lines)


def gallery_text(url: str, valid_for: str) -> str:
    return f"🖼 Your gallery (a private link, valid {valid_for}; do not share it):\n{url}"


def vary_region_text(url: str, valid_for: str) -> str:
    return ("🖌 Vary (Region): paint what should change and say what goes there "
            f"(a private link, valid {valid_for}; do not share it):\n{url}")


_STATUS_ICON = {
    JobStatus.queued: "⏳",
    JobStatus.running: "🎨",
    JobStatus.succeeded: "✅",
    JobStatus.failed: "❌",
    JobStatus.cancelled: "🚫",
}


def history_text(jobs: Sequence[JobRead]) -> str:
    if not jobs:
        return "No jobs yet. Try /imagine a lighthouse at dusk"
    lines = ["Your last jobs (press a number to run it again with a new seed):"]
    for n, job in enumerate(jobs, 1):
        icon = _STATUS_ICON.get(job.status, "•")
        lines.append(f"{n}. {icon} {prompt_preview(job.request.prompt, 80)}")
    return "\n".join(lines)


def link_code_text(code: str, minutes: int) -> str:
    return (
        f"🔗 Your link code: {code}\nOn your other account (Telegram, Discord or the web), send "
        f"/link {code} within {minutes} minutes. Credits and galleries will then be shared."
    )


def apikey_text(key: str, base_url: str) -> str:
    base = base_url.rstrip("/")
    return (
        f"🔑 Your API key (shown only this once; keep it secret):\n{key}\n"
        f"Use it as \"Authorization: Bearer <key>\" for {base}/api/v1, or as the password "
        f"(any user name) of Basic auth for the A1111 API at {base}/sdapi/v1."
    )


def linked_text() -> str:
    return "🔗 Linked! Your accounts now share one balance and one gallery."


def style_picker_text(default: str | None) -> str:
    current = default or "none"
    return f"Pick your default style (now: {current}). Flags like --style still win."


def restyle_picker_text() -> str:
    return "Pick a style to run this prompt again with:"


def style_set_text(style: str | None) -> str:
    return f"Default style: {style}." if style else "Default style cleared."


def cancel_asked(status: JobStatus) -> str:
    if status is JobStatus.cancelled:
        return "🚫 Cancelled before it started; the credits were refunded."
    return "Stopping the job… the credits will be refunded."
