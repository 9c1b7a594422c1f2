"""fracdet: bone-fracture detection on radiographs that reports numbers you can trust.

The public surface grows stage by stage along the pipeline
``data -> models -> training -> evaluation -> explain -> inference -> serve``.
Heavy parts (torch, OpenCV) are imported lazily, so ``import fracdet`` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

from fracdet.data import audit_dataset, load_dataset, make_splits, read_image

__all__ = ["__version__", "audit_dataset", "load_dataset", "make_splits", "read_image"]
