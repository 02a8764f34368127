"""Foundations every layer uses: typed configs and one-line errors (config), command-line plumbing (cli), library
log diversion (logs), atomic file writes (atomic)."""
