"""One module per CLI command; each exposes `main(args) -> int` and nothing the CLI must know."""
