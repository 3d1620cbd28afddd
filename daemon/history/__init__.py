"""The cleanup history: the JSON-lines log and its event kinds."""
