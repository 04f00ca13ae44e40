"""Stage 1: a projector from a source store's space into a target store's space, beside closed-form baselines."""
