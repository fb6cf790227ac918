"""study.models: each registered model's contract, published sizes, normalisation, errors, an MNIST-1D fit."""

from __future__ import annotations

import time

import pytest
import torch

from study import data, models

# Small options for the big ones: the contract does not depend on width.
_SMALL_OPTIONS = {"wide_resnet": {"depth": 10, "widen_factor": 1}}


def _shape_for(name: str) -> tuple[int, ...]:
    return {"signal": (2, 40), "image": (3, 8, 8), "any": (2, 5, 6)}[models.MODELS[name].input_kind]


def _contract(model: models.Classifier, shape: tuple[int, ...], k: int) -> None:
    x = torch.rand(4, *shape)
    model.eval()
    with torch.no_grad():
        logits, feats = model(x), model.features(x)
    assert logits.shape == (4, k) and feats.shape == (4, model.feature_dim)
    assert model.head.in_features == model.feature_dim and model.head.out_features == k
    torch.testing.assert_close(logits, model.head(feats))
    model.train()
    out = model(x)
    torch.nn.functional.cross_entropy(out, torch.arange(4) % k).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", models.list_models())
def test_registered_model_contract(name):
    torch.manual_seed(0)
    shape = _shape_for(name)
    model = models.create_model(name, shape, 5, **_SMALL_OPTIONS.get(name, {}))
    assert isinstance(model, models.Classifier)
    _contract(model, shape, 5)


@pytest.mark.parametrize("name,shape", [("tv:resnet18", (3, 16, 16)), ("tv:mobilenet_v3_small", (1, 32, 32))])
def test_torchvision_models(name, shape):
    torch.manual_seed(0)
    model = models.create_model(name, shape, 7, mean=[0.5] * shape[0], std=[0.2] * shape[0])
    _contract(model, shape, 7)
    if name == "tv:resnet18":
        assert model.feature_dim == 512 and isinstance(model.body.fc, torch.nn.Identity)


def test_normalisation_is_the_first_op():
    torch.manual_seed(0)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    normed = models.create_model("cnn", (3, 8, 8), 4, mean=mean, std=std).eval()
    plain = models.create_model("cnn", (3, 8, 8), 4).eval()
    plain.load_state_dict(normed.state_dict(), strict=False)  # same weights, buffers mean 0 / std 1
    plain.mean.zero_()
    plain.std.fill_(1.0)
    x = torch.rand(3, 3, 8, 8)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain((x - m) / s))
    assert {"mean", "std"} <= dict(normed.named_buffers()).keys()  # moved by .to(device), saved in state_dict


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sizes_match_the_papers():
    # MNIST-1D ConvBase (Greydanus): Conv1d(1,25,5) + 2 x Conv1d(25,25,3) + Linear(125, 10).
    cnn1d = models.create_model("cnn1d", (1, 40), 10)
    assert cnn1d.feature_dim == 125
    assert _n_params(cnn1d) == (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)
    mlp = models.create_model("mlp", (1, 40), 10)
    assert _n_params(mlp) == (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)
    # He et al. 2016 Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters; WRN-28-10: 36.5M (Zagoruyko 2016).
    with torch.device("meta"):  # no memory, no init cost
        sizes = {
            n: _n_params(models.create_model(n, (3, 32, 32), 10))
            for n in ("resnet20", "resnet56", "wide_resnet")
        }
    assert round(sizes["resnet20"] / 1e6, 2) == 0.27 and round(sizes["resnet56"] / 1e6, 2) == 0.85
    assert round(sizes["wide_resnet"] / 1e6, 1) == 36.5
    # Option A shortcuts are parameter-free; option B adds 1x1 projections at the two downsampling blocks.
    b = models.create_model("resnet20", (3, 32, 32), 10, shortcut="B")
    assert _n_params(b) - sizes["resnet20"] == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_cifar_resnet18_and_34_are_torchvisions_with_a_cifar_stem():
    import torchvision

    # Same blocks and widths as torchvision's ImageNet ResNet-18/34; only the stem differs: a 3x3x3x64
    # conv instead of 7x7x3x64 (the max-pool has no parameters). 11.17M for 10 classes, the figure of
    # the common CIFAR ResNet-18 (kuangliu/pytorch-cifar).
    with torch.device("meta"):
        for depth, tv in ((18, torchvision.models.resnet18), (34, torchvision.models.resnet34)):
            for k in (10, 100):
                ours = _n_params(models.create_model(f"resnet{depth}", (3, 32, 32), k))
                assert ours == _n_params(tv(num_classes=k)) - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64
    model = models.create_model("resnet18", (3, 32, 32), 100).eval()
    assert model.feature_dim == 512
    sizes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        for m in model.body
        if isinstance(m, torch.nn.Module) and type(m).__name__ == "_BasicBlock"
    ]
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    # 32x32 kept through stage 1, then halved at each stage: 4x4 before the pooling.
    assert sizes == [32, 32, 16, 16, 8, 8, 4, 4]


def test_shape_mismatch_and_bad_options():
    with pytest.raises(ValueError) as e:
        models.create_model("cnn1d", (3, 32, 32), 10)
    assert str(e.value) == (
        "model 'cnn1d' needs 1-D signals of shape (C, L), but dataset has input shape (3, 32, 32)"
    )
    for name in ("resnet20", "cnn", "wide_resnet", "tv:resnet18"):
        with pytest.raises(ValueError, match=r"needs images of shape \(C, H, W\)"):
            models.create_model(name, (1, 40), 10)
    with pytest.raises(ValueError, match="resnet20") as e:
        models.create_model("alexnet9", (3, 32, 32), 10)
    assert all(n in str(e.value) for n in models.list_models())
    with pytest.raises(ValueError, match="hidden"):
        models.create_model("mlp", (1, 40), 10, widths=(10,))
    with pytest.raises(ValueError, match="torchvision model must be one of"):
        models.create_model("tv:resnet7", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="3 entries"):
        models.create_model("cnn", (3, 8, 8), 10, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="std must be > 0"):
        models.create_model("mlp", (1, 40), 10, mean=(0.0,), std=(0.0,))
    with pytest.raises(ValueError, match="depth"):
        models.create_model("wide_resnet", (3, 8, 8), 10, depth=27)
    with pytest.raises(ValueError, match="too small"):
        models.create_model("cnn1d", (1, 2), 10)
    with pytest.raises(ValueError, match="num_classes"):
        models.create_model("mlp", (1, 40), 1)


@pytest.mark.slow
def test_cnn1d_learns_mnist1d():
    """The paper's ConvBase reaches ~92% on MNIST-1D; a 12-epoch one-cycle run must clear 85%."""
    bundle = data.load_dataset("mnist1d")  # the on-disk cache: generated once (~1-3 s), then read
    torch.manual_seed(0)
    model = models.create_model("cnn1d", bundle.input_shape, 10, mean=bundle.mean, std=bundle.std)
    batches = data.DeviceBatches(
        bundle.x_train,
        bundle.y_train,
        100,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        to_float=bundle.to_float,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=12 * len(batches))
    t0 = time.perf_counter()
    for _ in range(12):
        for xb, yb in batches:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    wall = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model.eval()(bundle.x_test).argmax(1) == bundle.y_test).float().mean().item()
    assert acc > 0.85, f"test accuracy {acc:.3f}"
    assert wall < 60, (
        f"training took {wall:.1f} s"
    )  # loose: the machine may be shared (measured ~10 s with 1 thread at load 6 on 2 cores)
