"""Datasets, Algorithm 1 (semi-supervised Inf-Net), Algorithm 2 (staged fusion), metrics.

API overview (import from the submodules; this package imports nothing heavy itself):

Preparation (``Preprocessing``, the lung window, the HU decoder, series and slice choice,
``build_model`` / ``load_version``) is the pipeline's: ``triaged.pipeline.preprocess``,
``.hu``, ``.transforms``, ``.builders``; training imports it from there
(``training.preprocess`` and ``training.builders`` re-export the old names).

``preprocess``
    re-exports ``triaged.pipeline.preprocess``: ``Preprocessing``, ``read_grey``,
    ``window_hu``, ``LUNG_WINDOW``.
``datasets``
    ``Sample``; readers ``covid_ct(root)``, ``covid_semiseg(root)``, ``medseg_png(root)``,
    ``synthetic(root, n, size, seed)``; ``SliceDataset(samples, prep, augment, seed,
    with_mask)``; ``load_image``, ``load_mask``, ``read_hu``, ``stable_split``.
``dicom_data``
    ``dicom_manifest(csv)``, ``worklist_labels(export)`` (format ``triaged-labels/1``),
    ``read_label_export``, ``study_slices`` (scoring's series and slice choice).
``metrics``
    ``accuracy``, ``f1``, ``auc``, ``confusion``, ``roc_curve``, ``bootstrap_ci``, ``report``,
    ``dice`` (COVID = 1 is the positive class).
``loop``
    ``Phase`` + ``run_phase`` (resumable, per-epoch checkpoints, torchrun), ``setup_runtime``.
``staged`` / ``semi`` / ``baseline``
    Algorithm 2 (``run_stage``), Algorithm 1 (``train_semi``), Rao et al.'s CNN
    (``train_baseline``), each with its settings dataclass (paper defaults).
``builders``
    ``init_backbone``; re-exports ``build_model``, ``load_version`` (``triaged.pipeline``).
``retrain``
    ``RetrainOptions``, ``retrain(options) -> RetrainResult``, ``evaluate_version``.
``cli``
    ``add_arguments(parser)``, ``run(args, settings) -> exit status`` for ``triaged retrain``.
"""
