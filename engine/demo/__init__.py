"""The demo model: captioned scenes, their scorer, and the training that makes a small
Diffusers pipeline draw them (``atelier models train-demo``)."""
