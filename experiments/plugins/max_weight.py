"""An example plugin: a criterion of your own, named from the command line.

    .venv/bin/python experiments/prune.py plugins=[experiments/plugins/max_weight.py] \
        method.criteria=[car,max_weight]

`plugins=` imports this file before the config's criteria are checked; the criterion it
registers then runs like the built-in ones (same greedy schedule, trace and outputs).
"""

import torch

from carlib.network.graph import MaskedNet
from carlib.pruning.criteria import register_criterion


def max_weight(net: MaskedNet, layer: str, cut: object, kept: list[int],
               metric: str) -> tuple[torch.Tensor, None]:
    """The largest absolute weight of each kept filter (of the layer's own conv): filters whose
    weights are all small go first. No tally: the second value is None."""
    conv = net.gm.get_submodule(net.unit(layer).name)
    return conv.weight.detach().flatten(1).abs().amax(1)[kept].double().cpu(), None


# depends="weights": the score changes only with the layer's own weights, so the network-wide
# schedule may reuse it between steps
register_criterion("max_weight", max_weight, depends="weights")
