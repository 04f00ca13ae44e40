"""Contrastive training of image towers on paired columns (photo <-> sketch), saved as encoders."""
