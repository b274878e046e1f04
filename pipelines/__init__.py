"""Augmentation pipelines: recipes as data, a DALI backend for image files, a batched-tensor backend for in-memory sets."""
