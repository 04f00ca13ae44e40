"""Search: a query through its encoder (and projector) against a gallery store."""
