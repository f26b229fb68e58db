"""Frozen-feature pieces shared by evaluation (`eval/`) and the pretraining monitor (`pretrain/monitor.py`): pooling
an encoder's output into one vector per image, the weighted kNN classifier and its top-1 accuracy.

Pure torch: no data loading, no model loading, so that both layers reuse the very same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_tokens(hidden: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """Mean of the patch tokens. hidden: `(B, L, D)` tokens or `(B, D, H, W)` maps -> `(B, D)`."""
    if hidden.ndim == 3:
        return hidden[:, prefix_tokens:].mean(dim=1)
    if hidden.ndim == 4:
        return hidden.mean(dim=(2, 3))
    if hidden.ndim == 2:
        return hidden
    raise ValueError(f"cannot pool a hidden state of shape {tuple(hidden.shape)}")


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN votes `(M, num_classes)`: cosine similarity, the k nearest training points each vote
    `exp(similarity / temperature)` for their class.

    train_features: `(N, D)`, train_labels: `(N,)` int, test_features: `(M, D)`.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels have different lengths")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].float().to(train.device), dim=1)
        sims, idx = (queries @ train.T).topk(k, dim=1)
        votes = torch.zeros(queries.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[idx], (sims / temperature).exp())
        scores.append(votes)
    return torch.cat(scores).cpu()


def top1_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose highest score is the label (ties go to the lower class id, as in the accuracy
    metric's stable ranking). scores: `(M, C)`, labels: `(M,)`."""
    return float((scores.argmax(dim=1).cpu() == torch.as_tensor(labels).long().cpu()).double().mean())
