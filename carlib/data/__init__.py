"""Data: datasets and splits, the generated shapes set, images decoded once."""
