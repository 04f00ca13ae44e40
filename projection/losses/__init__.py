"""Losses: the registry that builds them by name (``registry.py``), pair/metric-learning losses and their geometry."""
