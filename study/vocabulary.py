"""The names that appear in results, each defined once and read by both ``study/`` and ``reports/``.

Torch-free and pydantic-free on purpose: the report builder imports it without loading torch.
Registries (``study.noise``, ``study.robustness``) hold implementations; this module holds what a
reader of the results needs to know about a name: its order, its label, which direction is better
and which question of the report it answers. A metric listed in ``METRICS`` with a question is shown
in that question's tables as soon as a trial emits it.
"""

from __future__ import annotations

from dataclasses import dataclass

# ------------------------------------------------------------------------------------------ trials

PHASES = ("search", "final")
TRIAL_STATUSES = ("completed", "pruned", "failed", "diverged")
# A final trial in one of these states is not run again on resume (a pruned final trial cannot exist).
FINAL_DONE_STATUSES = ("completed", "diverged", "failed")
# A run's manifest status follows its phases: running (search and final trials) -> search_done (every
# cell's search has ended; final trials may still run) -> post (transfer attacks, distillation) ->
# completed; or interrupted / failed.
MANIFEST_STATUSES = ("running", "search_done", "post", "completed", "interrupted", "failed")
# Manifest statuses of a run in progress: with nobody holding the results dir's lock, the driver died
# (SIGKILL, power loss) and `study ls` shows the study as "interrupted".
RUNNING_STATUSES = ("running", "search_done", "post")
# The results directory's writer lock (study/sweep/lock.py) and its sidecar naming the holder.
LOCK_FILE = ".study.lock"
LOCK_OWNER_FILE = ".study.lock.owner"
SPLITS = ("test", "val", "train")

# Per-epoch columns every trial reports (epochs.parquet); a regularizer's own terms add ``term_*``.
EPOCH_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_accuracy", "val_nll", "val_ece", "wall_s")
TERM_PREFIX = "term_"

# Validation metrics a search can optimise, with their direction.
SEARCH_METRICS = {"val_accuracy": "maximize", "val_nll": "minimize", "val_ece": "minimize"}

# ------------------------------------------------------------------------------------------- noise

# Built-in noise kinds in display order, with the short label used in narrow report headers. The
# registry in study.noise implements them (a test checks the two agree).
NOISE_KINDS: dict[str, str] = {
    "none": "none",
    "symmetric": "sym",
    "asymmetric": "asym",
    "pairflip": "pair",
    "instance": "inst",
    "adversarial": "adv",
    "human": "hum",  # CIFAR-10N / CIFAR-100N: settings human-<label set>
    "file": "file",  # a user's label file: settings file-<file stem>
}
ADVERSARIAL_MODES: dict[str, str] = {"confident": "conf", "boundary": "bnd"}

# ---------------------------------------------------------------------------------- eval conditions

CLEAN = "clean"
ATTACKS = ("fgsm", "pgd_ce", "pgd_dlr", "transfer")
CORRUPTION_MEAN = "corruption_mean"  # accuracy averaged over the corruptions at one severity
DISTILL = "distill"
# evals.condition values that are not a corruption's name (everything else is one).
NON_CORRUPTION_CONDITIONS = frozenset({CLEAN, *ATTACKS, CORRUPTION_MEAN, DISTILL})
# Conditions whose accuracy the report's robustness question shows, in this order.
ROBUSTNESS_CONDITIONS = (*ATTACKS, CORRUPTION_MEAN)

# ------------------------------------------------------------------------------------------ metrics

HIGHER, LOWER, NEITHER = 1, -1, 0

Q_ACCURACY = "Clean test accuracy"
Q_CALIBRATION = "Calibration"
Q_ROBUSTNESS = "Robustness"
Q_CORRUPTIONS = "Corruption robustness"
Q_NOISE = "Label noise"
Q_GEOMETRY = "Feature geometry"
Q_DISTILLATION = "Distillation"
# The report's questions, in the order it answers them.
QUESTIONS = (Q_ACCURACY, Q_CALIBRATION, Q_ROBUSTNESS, Q_CORRUPTIONS, Q_NOISE, Q_GEOMETRY, Q_DISTILLATION)


@dataclass(frozen=True)
class Metric:
    """A metric as results carry it (evals.metric) and as the report shows it.

    ``question`` None: stored but not tabled (e.g. reliability bins, timings).
    """

    name: str
    label: str
    better: int
    question: str | None = None
    split: str = "test"
    condition: str = CLEAN


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "accuracy", HIGHER, Q_ACCURACY),
    Metric("ece", "ECE", LOWER, Q_CALIBRATION),
    Metric("nll", "NLL", LOWER, Q_CALIBRATION),
    Metric("brier", "Brier score", LOWER, Q_CALIBRATION),
    Metric("ece_ts", "ECE after temperature scaling", LOWER, Q_CALIBRATION),
    Metric(
        "calibration_gap", "mean confidence - accuracy (signed: > 0 overconfident)", NEITHER, Q_CALIBRATION
    ),  # fmt: skip
    Metric("temperature", "fitted temperature T (> 1: overconfident)", NEITHER, Q_CALIBRATION),
    Metric("overconfidence_on_errors", "mean confidence on errors", LOWER, Q_CALIBRATION),
    Metric("mean_confidence", "mean confidence", NEITHER),
    Metric("mce", "MCE", LOWER),
    Metric("adaptive_ece", "adaptive ECE", LOWER),
    Metric("classwise_ece", "classwise ECE", LOWER),
    Metric("nll_ts", "NLL after temperature scaling", LOWER),
    Metric("adaptive_ece_ts", "adaptive ECE after temperature scaling", LOWER),
    Metric("brier_ts", "Brier score after temperature scaling", LOWER),
    Metric(
        "gradient_masking",
        "gradient masking flag (1 = a weaker attack beat PGD-CE)",
        LOWER,
        Q_ROBUSTNESS,
        condition="pgd_ce",
    ),  # fmt: skip
    Metric("memorisation_rate", "memorised flipped labels (train)", LOWER, Q_NOISE, split="train"),
    Metric(
        "clean_label_recovery",
        "recovered clean labels of flipped samples (train)",
        HIGHER,
        Q_NOISE,
        split="train",
    ),  # fmt: skip
    Metric(
        "train_accuracy_clean_labels", "train accuracy on the clean labels", HIGHER, Q_NOISE, split="train"
    ),  # fmt: skip
    Metric("r2", "R² = 1 - d_within/d_total (higher = more separable)", HIGHER, Q_GEOMETRY),
    Metric("d_within", "d_within (within-class cosine distance)", NEITHER, Q_GEOMETRY),
    Metric("d_total", "d_total (cosine distance over all pairs)", NEITHER),
    Metric("student_accuracy", "student accuracy", HIGHER, Q_DISTILLATION, condition=DISTILL),
    Metric("teacher_accuracy", "teacher accuracy", HIGHER, Q_DISTILLATION, condition=DISTILL),
    Metric(
        "distill_gain",
        "student accuracy - same student on the labels alone",
        HIGHER,
        Q_DISTILLATION,
        condition=DISTILL,
    ),  # fmt: skip
    Metric("teacher_student_gap", "teacher accuracy - student accuracy", LOWER, condition=DISTILL),
    Metric("baseline_student_accuracy", "student trained on the labels alone", HIGHER, condition=DISTILL),
    Metric("student_ece", "student ECE", LOWER, condition=DISTILL),
    Metric("distill_wall_s", "distillation wall time (s)", NEITHER, condition=DISTILL),
)
METRIC_BY_NAME = {m.name: m for m in METRICS}
# Per-bin rows of the reliability diagram (severity = bin index): stored, drawn, never tabled.
BIN_METRIC_PREFIX = "bin_"


def metrics_for(question: str) -> list[Metric]:
    return [m for m in METRICS if m.question == question]


# The one metric per question that the report's findings answer with (robustness picks its attack
# and corruption rows from what the study measured).
FINDING_METRICS = {
    Q_ACCURACY: "accuracy",
    Q_CALIBRATION: "ece",
    Q_NOISE: "memorisation_rate",
    Q_GEOMETRY: "r2",
    Q_DISTILLATION: "student_accuracy",
}
# Metrics on a [0, 1] scale, shown as percentages / differences in percentage points.
PERCENT_METRICS = frozenset(
    {"accuracy", "ece", "mce", "adaptive_ece", "classwise_ece", "ece_ts", "memorisation_rate",
     "clean_label_recovery", "train_accuracy_clean_labels", "student_accuracy", "teacher_accuracy",
     "student_ece", "calibration_gap", "overconfidence_on_errors", "mean_confidence", "distill_gain",
     "teacher_student_gap", "baseline_student_accuracy"}
)  # fmt: skip
# Equivalence margins of the verdicts (reports/verdicts.py): a paired difference whose 90% interval lies
# inside (-margin, +margin) is "equivalent" (two one-sided tests at 5%). One point for [0, 1] metrics;
# these for the others; a metric with neither gets no equivalence verdict (better, worse or undecided).
# A spec's `margins:` overrides them per metric.
DEFAULT_MARGIN_POINTS = 0.01
MARGINS: dict[str, float] = {
    "nll": 0.02, "nll_ts": 0.02, "brier": 0.01, "brier_ts": 0.01, "r2": 0.01, "temperature": 0.05,
}  # fmt: skip


def margin_of(metric: str, overrides: dict[str, float] | None = None) -> float | None:
    """The equivalence margin of `metric` (in its own units), or None when it has none."""
    if overrides and metric in overrides:
        return overrides[metric]
    if metric in MARGINS:
        return MARGINS[metric]
    return DEFAULT_MARGIN_POINTS if metric in PERCENT_METRICS else None


VERDICTS = ("better", "worse", "equivalent", "undecided")

# Short display names of the built-in regularizers (others are shown as they are named).
REGULARIZER_SHORT = {
    "ce": "CE",
    "label_smoothing": "LS",
    "maxsup": "MaxSup",
    "confidence_penalty": "CP",
    "online_label_smoothing": "OLS",
    "logit_penalty": "LogitPen",
    "logitnorm": "LogitNorm",
    "focal": "Focal",
    "disturb_label": "DisturbLbl",
}


def short_name(regularizer: str) -> str:
    """ "label_smoothing" -> "LS"; an arm at a matched strength "label_smoothing@alpha=0.1" -> "LS@α=0.1"."""
    base, at, variant = regularizer.partition("@")
    for name, letter in (("alpha", "α"), ("beta", "β"), ("gamma", "γ")):
        variant = variant.replace(f"{name}=", f"{letter}=")
    return REGULARIZER_SHORT.get(base, base) + at + variant
