"""Telegram update handlers, one module per feature; registered in ``bots.telegram.app``."""
