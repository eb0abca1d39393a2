"""carlib: CAR (Classification Accuracy Reduction) greedy filter pruning of CNNs."""

from carlib.errors import CarlibError
from carlib.graph import MaskedNet, prunable_layers
from carlib.greedy import Trace, greedy_prune
from carlib.scoring import car_scores

__all__ = ["CarlibError", "MaskedNet", "Trace", "car_scores", "greedy_prune", "prunable_layers"]
