"""carlib: CAR (Classification Accuracy Reduction) greedy filter pruning of CNNs."""

__version__ = "0.8.0"  # part of resume-state keys: bump when scores or traces change

from carlib.core.errors import CarlibError
from carlib.network.graph import MaskedNet, coverage, prunable_layers, units
from carlib.pruning.greedy import Trace, global_prune, greedy_prune
from carlib.scoring.car import car_scores

__all__ = ["CarlibError", "MaskedNet", "Trace", "car_scores", "coverage", "global_prune",
           "greedy_prune", "prunable_layers", "units"]
