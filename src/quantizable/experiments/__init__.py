"""Experiments built from the library: the paper's comparison (``reproduce``)."""

from quantizable.experiments.reproduce import METHODS, SCALES, TRAINED_FAMILIES, reproduce

__all__ = ["METHODS", "SCALES", "TRAINED_FAMILIES", "reproduce"]
