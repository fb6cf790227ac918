"""Trial fusion on a CUDA device: a pack trains each member like the trial alone (bf16 autocast, as
``fit``), on both forward paths. Skipped without a GPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from study.spec import TrainSpec
from study.trial.config import RegularizerSetting, TrialConfig
from study.trial.loop import fit
from study.trial.pack import fit_pack
from study.trial.run import prepare_data

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["cnn1d", "mlp"])
def test_a_cuda_pack_trains_each_member_like_the_trial_alone(model):
    regs = [("ce", {}), ("maxsup", {"alpha": 0.2}), ("online_label_smoothing", {"alpha": 0.5})]
    cfgs = [
        TrialConfig(
            model={"name": model},
            regularizer=RegularizerSetting(name=name, params=params),
            seed=i,
            train=TrainSpec(epochs=2, lr=0.01 * (i + 1), device="cuda", precision="fp32"),
        )
        for i, (name, params) in enumerate(regs)
    ]
    prep = prepare_data(cfgs[0])
    packed = fit_pack([(str(i), c, prep, None) for i, c in enumerate(cfgs)])
    for i, cfg in enumerate(cfgs):
        alone = fit(cfg, prep)
        assert packed[str(i)].status == alone.status == "completed"
        assert next(packed[str(i)].model.parameters()).is_cuda
        for a, p in zip(alone.epoch_rows, packed[str(i)].epoch_rows, strict=True):
            # TF32/cuBLAS reduction orders differ between the batched and the single-model kernels.
            assert abs(a["train_loss"] - p["train_loss"]) < 1e-3
            assert abs(a["val_accuracy"] - p["val_accuracy"]) < 2e-2


def test_a_cuda_pack_uses_bf16_autocast_like_fit():
    train = TrainSpec(epochs=1, device="cuda", precision="auto")
    cfgs = [TrialConfig(model={"name": "cnn1d"}, seed=s, train=train) for s in range(4)]
    prep = prepare_data(cfgs[0])
    packed = fit_pack([(str(s), c, prep, None) for s, c in enumerate(cfgs)])
    for s, cfg in enumerate(cfgs):
        alone = fit(cfg, prep)
        assert abs(alone.epoch_rows[0]["train_loss"] - packed[str(s)].epoch_rows[0]["train_loss"]) < 5e-2
    assert torch.cuda.is_available()
