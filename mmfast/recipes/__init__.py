"""Runnable experiments built on the mmfast losses (``python -m mmfast.recipes.<name>``)."""
