"""Training: the per-worker loop (``loop``), Ray Train wiring and variants (``launch``),
checkpoints, LR schedules and the driver's progress line."""

from .schedule import lr_at

__all__ = ["lr_at"]
