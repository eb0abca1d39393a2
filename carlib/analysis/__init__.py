"""Analysis of runs: intervals and tests, rank agreement, per-class CAR, color, diversity."""
