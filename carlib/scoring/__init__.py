"""Scoring: measuring a network on data, and CAR's engine (cuts, cache, exact tallies)."""
