"""regstudy: studies of label-smoothing-family regularizers under label noise."""

__version__ = "0.1.0"
