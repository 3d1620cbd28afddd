"""The invariants no policy can override: facts (the /proc pass) and guard (pure)."""
