"""The training engine every trainer shares: the loop (``loop.py``) and its checkpoints (``checkpoint.py``)."""
