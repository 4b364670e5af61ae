"""Frozen-feature evaluation: extraction now; k-NN, linear and dense probes with the evaluation issue."""
