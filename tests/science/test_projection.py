import pytest
import torch

from study.metrics import project_features, template_plane_basis


def test_basis_is_orthonormal_and_spans_the_templates():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 16, generator=g)
    basis, origin = template_plane_basis(w)
    assert torch.allclose(basis @ basis.T, torch.eye(2, dtype=basis.dtype), atol=1e-12)
    # Each template lies in the plane: projecting and mapping back reconstructs it exactly.
    coords = (w.double() - origin) @ basis.T
    assert torch.allclose(coords @ basis + origin, w.double(), atol=1e-10)


def test_in_plane_distances_are_preserved_and_out_of_plane_offsets_dropped():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 8, generator=g)
    basis, origin = template_plane_basis(w[:3])
    a, b = torch.randn(2, 2, generator=g, dtype=torch.float64)
    pa, pb = origin + a @ basis, origin + b @ basis
    normal = torch.randn(8, generator=g, dtype=torch.float64)
    normal -= (basis @ normal) @ basis  # orthogonal to the plane
    feats = torch.stack([pa, pb + 5 * normal]).float()
    rows = project_features(feats, torch.tensor([0, 2]), w)
    got = torch.tensor([[r["x"], r["y"]] for r in rows], dtype=torch.float64)
    assert torch.allclose(got, torch.stack([a, b]), atol=1e-5)
    assert [r["cls"] for r in rows] == [0, 2]


def test_only_the_three_classes_are_projected_and_collinear_templates_fail():
    w = torch.eye(4)
    rows = project_features(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 3, 1]), w)
    assert sorted(r["cls"] for r in rows) == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="collinear"):
        template_plane_basis(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
