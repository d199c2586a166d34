"""Atelier's domain: settings, errors, requests, styles, prompts, credits rules, image checks.

Pure Python + pydantic; nothing here touches a database, Redis, Ray or torch.
"""
