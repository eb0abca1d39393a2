"""Core: one-line user errors, float32-exact precision, atomic file writes and digests, a
module's device and eval mode, 95% intervals and comparisons over seeds, provenance."""
