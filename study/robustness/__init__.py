"""Robustness of a trained model: adversarial attacks (``attacks``: FGSM, PGD with CE or DLR loss,
transfer) and common corruptions computed on the fly (``corruptions``: Hendrycks' image set, a signal
set for 1-D data). Imported by module, not re-exported: corruptions import torchvision lazily."""
