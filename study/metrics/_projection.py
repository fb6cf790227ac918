"""Penultimate-layer projection onto the plane through three class templates (Mueller et al. 2019).

The templates are the rows of the final linear layer for three classes. Label smoothing pulls each
class into a tight cluster equidistant from the other templates; MaxSup claims to keep intra-class
variation. The 2-D coordinates are stored per final trial (long format) and plotted as a grid.
"""

from __future__ import annotations

import torch


def template_plane_basis(templates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis (2, D) of the plane through three templates (3, D), and its origin (D,).

    The plane through points w0, w1, w2 is w0 + span(w1 - w0, w2 - w0); Gram-Schmidt gives the basis.
    """
    if templates.shape[0] != 3:
        raise ValueError(f"need exactly 3 templates, but got {templates.shape[0]}.")
    w = templates.double()
    u = w[1] - w[0]
    v = w[2] - w[0]
    e1 = u / u.norm()
    v = v - (v @ e1) * e1
    if v.norm() < 1e-12:
        raise ValueError("the three templates are collinear; they span no plane.")
    e2 = v / v.norm()
    return torch.stack([e1, e2]), w[0]


def project_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    head_weight: torch.Tensor,
    classes: tuple[int, int, int] = (0, 1, 2),
) -> list[dict[str, float]]:
    """Rows {cls, x, y} for the samples of `classes`, projected onto the templates' plane.

    Args:
        features: penultimate activations (N, D).
        labels: clean labels (N,).
        head_weight: final linear layer weight (K, D); row k is class k's template.
        classes: the three classes whose templates span the plane.
    """
    basis, origin = template_plane_basis(head_weight[list(classes)].detach().cpu())
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in classes:
        mask |= labels == c
    f = features[mask].double().cpu()
    coords = (f - origin) @ basis.T
    return [
        {"cls": int(c), "x": float(p[0]), "y": float(p[1])}
        for c, p in zip(labels[mask].tolist(), coords, strict=True)
    ]
