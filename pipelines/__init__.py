"""Augmentation pipelines: recipes as data, a DALI backend for image files and a batched-tensor
backend for small in-memory sets (`build_loader` picks one)."""
