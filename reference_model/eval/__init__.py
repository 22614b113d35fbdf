"""Evaluation of the reference model (README "Evaluation"): ``evaluate(...) -> dict``.

Zero-shot classification with prompt ensembles, image↔text retrieval, video classification
(zero-shot and a linear probe), hashtag mAP, robustness (noise, blur, FGSM), and the same for
the int8-quantized model, ToMe / EViT at inference, and retrieval through an int8 /
PCA-reduced EmbeddingIndex — every metric beside its chance level.
``python -m reference_model.eval`` (xray-eval) runs it from the command line.
"""

from . import metrics, robustness
from .data import EvalData, build_eval_data
from .metrics import (average_precision, class_embeddings, linear_probe, map_chance,
                      mean_average_precision, pair_accuracy, random_average_precision,
                      random_recall, recall_from_ids, retrieval_chance, retrieval_recall,
                      topk_accuracy, topk_chance, zero_shot_accuracy)
from .report import format_table
from .suite import VARIANTS, default_evit, default_tome, evaluate, quantized_copy

__all__ = [
    "evaluate", "VARIANTS", "EvalData", "build_eval_data", "format_table", "metrics",
    "robustness", "average_precision", "class_embeddings", "linear_probe", "map_chance",
    "mean_average_precision", "pair_accuracy", "random_average_precision", "random_recall",
    "recall_from_ids", "retrieval_chance", "retrieval_recall", "topk_accuracy", "topk_chance",
    "zero_shot_accuracy", "default_evit", "default_tome", "quantized_copy",
]
