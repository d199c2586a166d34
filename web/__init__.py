"""The web gallery (FastAPI behind signed, expiring links). The page itself is a later issue;
the link format it will verify lives in ``core.signing`` and is already issued by the bots."""
