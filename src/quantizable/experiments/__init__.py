"""Experiments built from the library: the paper's comparison (``reproduce``)."""

from quantizable.experiments.plan import METHODS, SCALES, TRAINED_FAMILIES
from quantizable.experiments.reproduce import reproduce

__all__ = ["METHODS", "SCALES", "TRAINED_FAMILIES", "reproduce"]
