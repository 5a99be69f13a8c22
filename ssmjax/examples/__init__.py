"""Runnable examples (``python -m ssmjax.examples.<name>``)."""
