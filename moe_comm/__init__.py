from ._native import C
