"""Test doubles shared by tests and benches (loopback fakes of Telegram, Discord, the Hugging Face
hub and a Ray autoscaler); never shipped in the wheel, never imported by product code."""
