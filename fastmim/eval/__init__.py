"""Evaluation of a pretrained encoder: DINO's weighted kNN and MAE's linear probe (``python -m fastmim.eval``)."""

from fastmim.eval.encoder import extract_features, load_encoder, pooled_features
from fastmim.eval.knn import knn_accuracy, knn_scores
from fastmim.eval.lars import LARS
from fastmim.eval.linprobe import LinearProbe

__all__ = ["LARS", "LinearProbe", "extract_features", "knn_accuracy", "knn_scores", "load_encoder", "pooled_features"]
