"""The engine: everything that needs torch or Diffusers (pipeline loading, the model and
adapter caches, device profiles, the Diffusers recipe, tiny and demo models, the Ray worker
actor). Only the worker side imports it: the job flow in ``cluster`` speaks to it through
``cluster.contract``."""
