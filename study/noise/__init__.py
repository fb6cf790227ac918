"""Label noise: ``corrupt(labels, num_classes, kind, rate, seed, **inputs) -> NoisyLabels``.

Noise kinds live in one registry (``NOISE_REGISTRY``): each entry names its generator and the
extra inputs it needs (coarse labels, features, reference probabilities), so the trial layer asks the
registry instead of knowing every kind. ``_given`` reads given noisy labels (CIFAR-N human labels, a
user's label file) for the kinds ``human`` and ``file``. ``_maps`` holds the class maps of asymmetric noise.
"""

from study.noise._corrupt import (
    ADVERSARIAL_MODES,
    NOISE_KINDS,
    NOISE_REGISTRY,
    NoiseInputs,
    NoiseKind,
    NoisyLabels,
    corrupt,
    corrupt_setting,
    instance_probabilities,
    noise_inputs,
    setting_label,
    synthetic_kinds,
    validate_noise,
)
from study.noise._given import (
    CIFARN,
    LabelFileError,
    given_label,
    human_labels_path,
    load_human_labels,
    load_label_file,
)
from study.noise._maps import CIFAR10_MAP, MNIST_MAP, asymmetric_map, superclass_next_map

__all__ = [
    "ADVERSARIAL_MODES",
    "CIFARN",
    "LabelFileError",
    "given_label",
    "human_labels_path",
    "load_human_labels",
    "load_label_file",
    "synthetic_kinds",
    "CIFAR10_MAP",
    "MNIST_MAP",
    "NOISE_KINDS",
    "NOISE_REGISTRY",
    "NoiseInputs",
    "NoiseKind",
    "NoisyLabels",
    "asymmetric_map",
    "corrupt",
    "corrupt_setting",
    "instance_probabilities",
    "noise_inputs",
    "setting_label",
    "superclass_next_map",
    "validate_noise",
]
