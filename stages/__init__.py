"""One entry point per pipeline stage; each parses its config and calls `pipeline` in order."""
