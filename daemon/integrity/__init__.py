"""Integrity checks of checkpoints without the frameworks (see `daemon/integrity/check.py`)."""
