"""Test-time adversarial evaluation: FGSM, PGD on CE or DLR loss, and transfer attacks.

All attacks are L-inf attacks on the inputs. Label-smoothing-family losses rescale logits, which can mask
cross-entropy gradients (Fu et al. 2020), so the study reports, besides white-box PGD-CE, PGD on the
scale-invariant DLR loss (Croce & Hein 2020) and PGD-CE transferred from the CE-trained model of the same
cell. `gradient_masking_flag` turns the three into one warning.

Models take x and return logits (B, K). Attacks run on x's device, put the model(s) in eval mode for the
duration (so dropout/batch-norm do not change between steps) and restore the previous mode afterwards.
Gradients are taken with `torch.autograd.grad` with respect to the input only, so parameters never get a
``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.vocabulary import ATTACKS

PGD_LOSSES = ("ce", "dlr")


def validate_attack(name: str) -> str:
    """Returns `name` if it is a known attack, else raises ValueError listing the known ones."""
    if name not in ATTACKS:
        raise ValueError(
            f"attack must be one of {ATTACKS} (allowed: {', '.join(ATTACKS)}), but got {name!r}."
        )
    return name


def _validate_eps(eps: float) -> float:
    if not (eps >= 0.0):  # also rejects NaN
        raise ValueError(f"eps must be a finite number >= 0 (allowed: [0, inf)), but got {eps}.")
    return float(eps)


def _validate_step_size(step_size: float | None) -> float | None:
    if step_size is None:
        return None
    if not (0.0 < step_size < float("inf")):  # also rejects NaN
        raise ValueError(
            f"step_size must be a finite number > 0 or None (allowed: (0, inf) or None for eps / 4), "
            f"but got {step_size}."
        )
    return float(step_size)


def eps_for_data(eps: float, *, data_std: float | None, value_range: tuple[float, float] | None) -> float:
    """Converts a study's eps into input units.

    Images with a valid range (e.g. (0, 1)) use eps as given (8/255 is 8 grey levels). Standardised data
    without a range (MNIST-1D) has no natural pixel unit, so there eps is read in units of the data's
    standard deviation and the returned eps is ``eps * data_std``; such data must also be attacked with
    ``clamp=None``. A PGD step size written by the user (spec ``evaluate.pgd_step_size``) is a length in
    the same units as eps, so it goes through this same conversion.

    Args:
        eps: Requested radius, >= 0.
        data_std: Standard deviation of the (training) inputs; required when `value_range` is None.
        value_range: (low, high) of valid inputs, or None for unbounded standardised data.

    Returns:
        The L-inf radius to pass to the attacks.
    """
    eps = _validate_eps(eps)
    if value_range is not None:
        return eps
    if data_std is None or not (data_std > 0.0):
        raise ValueError(
            f"data_std must be > 0 when value_range is None (allowed: (0, inf)), but got {data_std}."
        )
    return eps * float(data_std)


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample DLR loss of Croce & Hein (2020), computed in float32.

    ``-(z_y - max_{k != y} z_k) / (z_pi1 - z_pi3 + 1e-12)`` with z_pi the logits sorted in descending
    order. Invariant to shifting and positive scaling of the logits, so saturated softmax cannot hide it.

    Args:
        logits: (B, K) with K >= 3.
        y: (B,) integer targets.

    Returns:
        (B,) losses; positive when the sample is misclassified.
    """
    if logits.ndim != 2 or logits.shape[1] < 3:
        raise ValueError(f"logits must have shape (B, K) with K >= 3 for DLR, but got {tuple(logits.shape)}.")
    z = logits.float()
    z_sorted = z.sort(dim=1, descending=True).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    # max over k != y: the top logit unless it is y's own, then the runner-up.
    top_is_y = z.argmax(dim=1) == y
    z_other = torch.where(top_is_y, z_sorted[:, 1], z_sorted[:, 0])
    return -(z_y - z_other) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)


def _ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": _ce_loss, "dlr": dlr_loss}


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Puts the given models in eval mode and restores each one's previous mode on exit."""
    present = [m for m in models if m is not None]
    modes = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for m, mode in zip(present, modes, strict=True):
            m.train(mode)


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, loss: str) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        # Sum, not mean: per-sample gradients must not shrink with the batch size (matters for fp16).
        value = _LOSSES[loss](model(x), y).sum()
        (grad,) = torch.autograd.grad(value, x)
    return grad


def _clamp(x: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    return x if clamp is None else x.clamp(clamp[0], clamp[1])


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, clamp: tuple[float, float] | None) -> Tensor:
    """FGSM: ``x + eps * sign(grad_x CE)``, then clamped into `clamp` if given.

    Args:
        model: Maps x to logits (B, K).
        x: (B, ...) clean inputs.
        y: (B,) targets.
        eps: L-inf radius >= 0; eps == 0 returns a copy of x.
        clamp: Valid input range (low, high), or None for unbounded data.

    Returns:
        Adversarial inputs, same shape and dtype as x, detached.
    """
    eps = _validate_eps(eps)
    if eps == 0.0:
        return x.detach().clone()
    with eval_mode(model):
        grad = _input_grad(model, x, y, "ce")
    return _clamp(x.detach() + eps * grad.sign(), clamp).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    loss: str = "ce",
    random_start: bool = True,
    clamp: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Madry et al. PGD in the L-inf ball; returns the last iterate.

    Starts from a uniform random point of the eps-ball (if `random_start`), takes `steps` ascent steps
    ``step_size * sign(grad_x loss)`` and after each projects onto the eps-ball around x and into `clamp`.

    Args:
        model: Maps x to logits (B, K).
        x: (B, ...) clean inputs.
        y: (B,) targets.
        eps: L-inf radius >= 0; eps == 0 returns a copy of x.
        steps: Number of ascent steps, >= 0.
        step_size: Step size > 0 in the same (input) units as eps, the same for every eps; None means
            eps / 4 (CIFAR-10 convention: eps 8/255, step 2/255). A step larger than 2 * eps only
            bounces between corners of the ball, since every iterate is projected back.
        loss: "ce" or "dlr" (DLR needs K >= 3).
        random_start: Start from a uniform random point of the ball instead of x.
        clamp: Valid input range (low, high), or None for unbounded data.
        generator: Generator for the random start; must live on x's device.

    Returns:
        Adversarial inputs, same shape and dtype as x, detached.
    """
    eps = _validate_eps(eps)
    if loss not in PGD_LOSSES:
        raise ValueError(
            f"loss must be one of {PGD_LOSSES} (allowed: {', '.join(PGD_LOSSES)}), but got {loss!r}."
        )
    if steps < 0:
        raise ValueError(f"steps must be >= 0 (allowed: 0, 1, 2, ...), but got {steps}.")
    step_size = _validate_step_size(step_size)
    alpha = eps / 4 if step_size is None else step_size
    x = x.detach()
    if eps == 0.0:
        return x.clone()
    lo, hi = x - eps, x + eps
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = _clamp(x + (2 * noise - 1) * eps, clamp)
    with eval_mode(model):
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y, loss)
            x_adv = x_adv + alpha * grad.sign()
            x_adv = _clamp(torch.minimum(torch.maximum(x_adv, lo), hi), clamp)
    return x_adv.detach()


def _craft(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str,
    eps: float,
    *,
    source_model: nn.Module | None,
    steps: int,
    step_size: float | None,
    clamp: tuple[float, float] | None,
    generator: torch.Generator | None,
) -> Tensor:
    if attack == "fgsm":
        return fgsm(model, x, y, eps, clamp=clamp)
    kw = dict(steps=steps, step_size=step_size, clamp=clamp, generator=generator)
    if attack == "pgd_ce":
        return pgd(model, x, y, eps, loss="ce", **kw)
    if attack == "pgd_dlr":
        return pgd(model, x, y, eps, loss="dlr", **kw)
    assert source_model is not None  # checked by the callers
    return pgd(source_model, x, y, eps, loss="ce", **kw)


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor) -> int:
    return int((model(x).argmax(dim=1) == y).sum().item())


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512) -> float:
    """Clean accuracy of `model` on (x, y), batched, in eval mode (mode restored)."""
    if len(x) == 0:
        raise ValueError("x must contain at least one sample, but got 0.")
    with eval_mode(model):
        correct = sum(
            _correct(model, x[i : i + batch_size], y[i : i + batch_size])
            for i in range(0, len(x), batch_size)
        )
    return correct / len(x)


def adversarial_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str,
    eps: float,
    *,
    source_model: nn.Module | None = None,
    steps: int = 10,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = None,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
) -> float:
    """Accuracy of `model` on adversarial examples crafted batch by batch.

    "transfer" crafts PGD-CE examples on `source_model` (typically the CE-trained model of the same cell)
    and evaluates them on `model`. eps == 0 gives the clean accuracy. Memory is bounded by `batch_size`.

    Args:
        model: Evaluated model, logits (B, K).
        x: (N, ...) clean inputs; everything runs on x.device.
        y: (N,) targets.
        attack: One of ATTACKS.
        eps: L-inf radius >= 0 (see `eps_for_data`).
        source_model: Required for "transfer".
        steps, step_size, clamp: As in `pgd`.
        batch_size: Samples per attack batch.
        generator: Generator for PGD random starts, on x.device.

    Returns:
        Fraction of samples still classified correctly, in [0, 1].
    """
    validate_attack(attack)
    eps = _validate_eps(eps)
    step_size = _validate_step_size(step_size)
    if attack == "transfer" and source_model is None:
        raise ValueError(
            "source_model must be given for attack 'transfer' (allowed: an nn.Module), but got None."
        )
    if eps == 0.0:
        return accuracy(model, x, y, batch_size=batch_size)
    correct = 0
    with eval_mode(model, source_model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            x_adv = _craft(
                model, xb, yb, attack, eps, source_model=source_model, steps=steps,
                step_size=step_size, clamp=clamp, generator=generator,
            )  # fmt: skip
            correct += _correct(model, x_adv, yb)
    return correct / len(x)


def robustness_rows(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps_list: Sequence[float],
    attacks: Sequence[str] = ATTACKS,
    source_model: nn.Module | None = None,
    steps: int = 10,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = None,
    batch_size: int = 512,
    seed: int = 0,
) -> list[dict]:
    """Long-format rows for evals.parquet, one per (attack, eps).

    Each row uses a fresh generator seeded with `seed`, so a row does not depend on which other rows were
    computed and every model of a study sees the same random starts. eps 0 rows hold the clean accuracy.

    Args:
        model, x, y, source_model, clamp, batch_size: As in `adversarial_accuracy`.
        eps_list: Radii in input units (see `eps_for_data`).
        attacks: Names from ATTACKS.
        steps: PGD steps (pgd_ce, pgd_dlr, transfer); FGSM ignores it.
        step_size: PGD step in input units, one value for every eps; None means eps / 4 per eps.
            FGSM ignores it (its step is eps).
        seed: Seed of each row's random-start generator.

    Returns:
        Dicts {"condition": attack, "severity": eps, "metric": "accuracy", "value": accuracy}.
    """
    for a in attacks:
        validate_attack(a)
    for e in eps_list:
        _validate_eps(e)
    step_size = _validate_step_size(step_size)
    if "transfer" in attacks and source_model is None:
        raise ValueError("source_model must be given when attacks include 'transfer', but got None.")
    clean = accuracy(model, x, y, batch_size=batch_size) if 0 in eps_list else None
    rows = []
    for attack in attacks:
        for eps in eps_list:
            if eps == 0:
                value = clean
            else:
                gen = torch.Generator(device=x.device).manual_seed(seed)
                value = adversarial_accuracy(
                    model, x, y, attack, eps, source_model=source_model, steps=steps,
                    step_size=step_size, clamp=clamp, batch_size=batch_size, generator=gen,
                )  # fmt: skip
            rows.append({"condition": attack, "severity": float(eps), "metric": "accuracy", "value": value})
    return rows


def masking_gaps(rows: Iterable[Mapping]) -> dict[float, float]:
    """Per eps: how much lower the accuracy under transfer or PGD-DLR is than under white-box PGD-CE.

    Args:
        rows: Rows as produced by `robustness_rows` (keys condition, severity, metric, value); rows of
            other metrics or conditions are ignored.

    Returns:
        {eps: max(acc_pgd_ce - acc_other for other in (transfer, pgd_dlr) present at eps)} for each eps that
        has a pgd_ce row and at least one of the other two. Positive gaps mean the weaker attack succeeds
        more often than white-box PGD-CE.
    """
    acc: dict[tuple[str, float], float] = {}
    for r in rows:
        if r.get("metric", "accuracy") == "accuracy" and r["condition"] in ("pgd_ce", "pgd_dlr", "transfer"):
            acc[(r["condition"], float(r["severity"]))] = float(r["value"])
    gaps = {}
    for (cond, eps), ce_acc in acc.items():
        if cond != "pgd_ce":
            continue
        others = [acc[(o, eps)] for o in ("pgd_dlr", "transfer") if (o, eps) in acc]
        if others:
            gaps[eps] = max(ce_acc - o for o in others)
    return gaps


def gradient_masking_flag(rows: Iterable[Mapping], *, margin: float = 0.05) -> bool:
    """True when white-box PGD-CE looks weaker than it should: a sign of masked CE gradients.

    Transfer PGD (no access to the model's gradients) and PGD-DLR (same attack, scale-invariant loss) should
    not beat white-box PGD-CE by much. If, at some eps, either leaves accuracy lower than PGD-CE by more
    than `margin` (absolute accuracy), PGD-CE's robustness is likely an artefact of saturated gradients.

    Args:
        rows: Rows as produced by `robustness_rows`.
        margin: Tolerated accuracy gap, >= 0.

    Returns:
        True if any gap from `masking_gaps` exceeds `margin`; False when no eps can be compared.
    """
    if not (margin >= 0.0):
        raise ValueError(f"margin must be >= 0 (allowed: [0, 1]), but got {margin}.")
    return any(gap > margin for gap in masking_gaps(rows).values())
