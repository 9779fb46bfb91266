"""The model-input preprocessing, which lives in :mod:`triaged.pipeline.preprocess`.

Kept so that existing imports keep working; training code imports the pipeline module.
"""

from triaged.pipeline.preprocess import (
    LUNG_WINDOW,
    Preprocessing,
    Source,
    read_grey,
    resize,
    to_unit_range,
    window_hu,
)

__all__ = [
    "LUNG_WINDOW",
    "Preprocessing",
    "Source",
    "read_grey",
    "resize",
    "to_unit_range",
    "window_hu",
]
