"""Ray layer: actors and tasks that run core searches in parallel, Tune
sweeps, the Serve app and the model-zoo scanner (later issues)."""
