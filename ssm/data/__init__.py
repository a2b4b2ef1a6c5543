"""Datasets: LRA loaders, ListOps and Pathfinder generators, MNIST-format sequential images."""
