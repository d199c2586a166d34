"""Everything that runs jobs: broker, client, dispatcher, workers, engine, devices, models.

Kept import-light on purpose: front ends import the client and broker without torch.
"""
