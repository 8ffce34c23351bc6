"""steel_ray: distributed hyperparameter and ensemble search for Severstal steel-defect segmentation."""
from __future__ import annotations

__version__ = "0.1.0"
