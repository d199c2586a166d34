"""The job flow: broker, client, dispatcher, batch run, placement, settling, reconcile, autoscale,
events, keys, and the vocabulary it shares with the engine (the model catalogue and availability,
device classes, the worker contract). Never imports torch, Diffusers or the ``engine`` package."""
