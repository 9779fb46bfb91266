"""MONAI transforms (HU -> lung window -> slices -> tensors) and study scoring.

API overview (import from the submodules; this package imports nothing heavy itself):

``definition``
    ``load_pipeline(path) -> Pipeline`` (``pipelines/*.toml``, pydantic, ``extra="forbid"``;
    ``PipelineError`` names the file and the key); sections ``series``, ``preprocess``,
    ``models`` (role fusion|cbam, name, version "live"|exact, batch_size, fast), ``aggregate``,
    ``priority``, ``outputs``.
``models``
    ``load_models(pipeline, store, previous=None, device=None) -> LoadedModels``: reuses
    ``previous`` while the store's live tokens are unchanged (promotion/rollback picked up
    between studies); missing models are listed in ``.missing`` (scoring then skips), a model
    that does not fit its role or the lung window raises ``ModelMismatchError``.
``scoring``
    ``score_study(paths, pipeline, models, requested=None) -> StudyScore | Skip``;
    ``StudyScore.to_findings()`` feeds ``triaged.dicom.results.build_results(score.datasets,
    ...)``; ``StudyScore.to_dict()`` is the JSON summary; ``score_prepared`` scores an already
    prepared data dict.
``transforms``
    dict transforms ``LoadVolumed``, ``CanonicalOrientd``, ``LungFractiond``, ``SelectSlicesd``,
    ``LungWindowd``, ``ModelInputd``; ``preparation(...)`` composes them; ``to_source`` maps
    model-grid maps back onto the stored slice; ``SliceGeometry``.
``aggregate`` / ``priority``
    ``aggregate(probs, section)``; ``prioritise(p, section, requested) -> Priority``,
    ``requested_priority(ds)``.
``selection``
    the bridge to ``triaged.dicom.series``: ``choose_series(sources, section)``,
    ``load_series(choice)``, ``NoEligibleSeries``.
"""
