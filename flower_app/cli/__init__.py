"""The command line: `fl-run` and a local SuperLink the caller owns."""
