"""Core: one-line user errors, float32-exact precision, atomic file writes."""
