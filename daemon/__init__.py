"""ckptd: a checkpoint-retention daemon for ML training machines."""

__version__ = "0.1.0"
