"""One module per encoder library (open_clip, Hugging Face transformers, timm), each a ``FrozenEncoder``."""
