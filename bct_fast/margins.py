"""Re-export of :mod:`bct_fast.ops.margins` (the margin definitions), kept for existing imports."""
from bct_fast.ops.margins import Margin, MarginType, MarginValue, make_margin, target_function

__all__ = ["Margin", "MarginType", "MarginValue", "make_margin", "target_function"]
