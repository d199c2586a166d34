"""A fake Discord (REST v10 + gateway v10 on one loopback port, aiohttp from the dev extra) that
the real discord.py talks to in tests and benches; ``FakeDiscord`` is in ``server``, the
payloads it sends in ``payloads``, its REST routes in ``rest``."""
