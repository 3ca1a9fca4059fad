"""Worker-side ``tpq`` subcommands (see common/cli.py)."""
