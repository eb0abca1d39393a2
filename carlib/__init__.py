"""carlib: CAR (Classification Accuracy Reduction) greedy filter pruning of CNNs."""

__version__ = "0.6.0"  # part of resume-state keys: bump when scores or traces change

from carlib.errors import CarlibError
from carlib.graph import MaskedNet, coverage, prunable_layers, units
from carlib.greedy import Trace, global_prune, greedy_prune
from carlib.scoring import car_scores

__all__ = ["CarlibError", "MaskedNet", "Trace", "car_scores", "coverage", "global_prune",
           "greedy_prune", "prunable_layers", "units"]
