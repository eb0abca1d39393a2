"""Train a model from the config and save a checkpoint together with its config.

    python experiments/train.py model=lenet5 data=fashion_mnist train.epochs=3
"""

from __future__ import annotations

import hydra
from common import Settings, checkpoint_path, guard, load_data, train_model
from omegaconf import DictConfig
from ranks import one_process


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@guard
def main(cfg: DictConfig, s: Settings) -> None:
    bundle = load_data(cfg)
    train_model(cfg, bundle, checkpoint_path(cfg, bundle, s.device), s.device)


if __name__ == "__main__":
    one_process("train.py", "training is not distributed; prune.py and interpret.py "
                "train the model on rank 0 when they need it")
    main()
