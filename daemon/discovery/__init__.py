"""Find checkpoints in a root: layouts (names), scan (the phases), walker, sizecache."""
