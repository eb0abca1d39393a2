"""Several processes: the process group and its collectives, images split by batches."""
