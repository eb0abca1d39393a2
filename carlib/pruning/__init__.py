"""Pruning: criteria, the greedy loop and its trace, saved run state."""
