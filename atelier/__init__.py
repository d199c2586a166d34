"""Atelier's composition root: the ``atelier`` CLI and the wiring of processes."""
