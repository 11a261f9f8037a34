"""The DD student: model, training and samplers."""

from ddjax.student.loading import load_dd

__all__ = ["load_dd"]
