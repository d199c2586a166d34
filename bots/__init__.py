"""Chat front ends: Telegram and Discord bots, and what they share (``bots.common``)."""
