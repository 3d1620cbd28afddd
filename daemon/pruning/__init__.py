"""The one deletion path: pipeline (prune_root), deleter (apply), trash, lock."""
