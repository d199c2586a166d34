"""Mentions on Discord: what a person typed (``@everyone``, ``@here``, a role, a user) is
echoed in statuses, captions and refusals but pings nobody; only the bot's own mention of
the asker, on a result posted in the channel after the token expired, pings them."""

from __future__ import annotations

from testing.discord import payloads as p
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE, BOB, TINY, imagine

TYPED = f"@everyone @here <@&{p.ADMIN_ROLE}> <@{BOB}>"


async def test_nothing_a_person_typed_pings_anyone(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    inter, result = await imagine(discord_stack, ALICE, f"a fox {TYPED} --raw {TINY}")
    await fake.wait_for(
        lambda: any("✅" in (c.json or {}).get("content", "") for c in fake.calls_to("PATCH")),
        30,
        "the final status",
    )
    # A refusal echoes what was typed too (an unknown style's name).
    refused = await fake.slash(
        ALICE, "imagine", [p.option("prompt", f"a cat {TINY}"), p.option("style", TYPED)]
    )
    await fake.wait_for(lambda: refused.callback, 30, "the refusal")
    echoed = [c for c in fake.calls if "@everyone" in str(c.json)]
    assert len(echoed) >= 3, "the prompt should be echoed in the status, result and refusal"
    assert [(c.route, c.pings) for c in fake.calls if c.pings] == []
    assert all(not m["mention_everyone"] and not m["mentions"] and not m["mention_roles"]
               for m in fake.messages.values())
