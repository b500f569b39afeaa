"""A CPU-scale reasoning testbed: a task that needs intermediate steps, a tiny base LM, and both methods on it."""
