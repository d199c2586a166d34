"""The Telegram bot (python-telegram-bot): ``app.build_application()`` registers every handler,
``run.start_bot()`` starts it (long polling or webhook)."""
