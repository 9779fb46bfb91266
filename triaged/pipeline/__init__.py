"""Study preparation (series -> HU -> slices -> model tensors) and study scoring.

Preparation lives here once and training builds on it (``triaged.training`` imports these
modules; nothing here imports ``training``), so a model is trained on what it is fed.

API overview (import from the submodules; this package imports nothing heavy itself):

``hu``
    ``slice_hu(ds)`` (the one DICOM slice -> HU decoder, modality LUT), ``LUNG_WINDOW``
    ``(level, width)``, ``window_hu(hu, level, width)``, ``window_uint8``, ``window_bounds``.
``preprocess``
    ``Preprocessing(size, window_level, window_width)``: image -> ``(1, S, S)`` model input,
    stored in every model card; ``read_grey``, ``resize``, ``to_unit_range``.
``builders``
    ``build_model(architecture)``, ``load_version(model_version)``.

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
    ``LungWindowd`` (MONAI ``ScaleIntensityRanged``, clipped), ``ModelInputd``;
    ``slice_steps(...)`` (orientation, lung content, slice choice: shared with training),
    ``preparation_steps(...)`` / ``preparation(...)`` compose them; ``canonical_hu(path)`` one
    slice file as scoring sees it; ``to_source`` maps model-grid maps back onto the stored
    slice; ``SliceGeometry``.
``aggregate`` / ``priority``
    ``aggregate(probs, section)``; ``prioritise(p, section, requested) -> Priority``,
    ``requested_priority(ds)``.
``selection``
    the bridge to ``triaged.dicom.series``: ``expand(sources)``, ``series_rules(section)``
    for ``triaged.dicom.series.choose_series`` (which returns ``NoEligibleSeries``).
"""
