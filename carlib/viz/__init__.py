"""Figures: plotting helpers over tidy frames, filter galleries."""
