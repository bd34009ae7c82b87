"""MoRA adapters: math, checkpoints, merging, kernels and serving integrations."""
