"""The Telegram bot (python-telegram-bot): ``app.build_application()`` registers every handler,
``run.start_bot()`` / ``run.run_bot()`` start it (long polling or webhook)."""
