"""Evaluation of learned representations: the weighted kNN monitor."""

from fastse.eval.knn import extract_features, knn_accuracy, knn_eval, knn_predict

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "knn_eval"]
