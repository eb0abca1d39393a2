"""Analysis of runs: rank agreement, per-class CAR, color selectivity, diversity."""
