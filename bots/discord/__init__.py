"""The Discord front end (discord.py 2.x): slash commands and persistent buttons, a thin adapter
over the shared chat core in ``bots.common``."""
