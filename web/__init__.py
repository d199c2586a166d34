"""The web front end: a FastAPI app built by ``web.app.create_app`` over a ``WebContext`` (the
gallery behind signed links, and the APIs). It never imports ``bots`` or ``atelier``."""
