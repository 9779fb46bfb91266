"""Datasets, Algorithm 1 (semi-supervised Inf-Net), Algorithm 2 (staged fusion), metrics.

API overview (import from the submodules; this package imports nothing heavy itself):

``preprocess``
    ``Preprocessing(size, window_level, window_width)``: ``prep(image, "display"|"hu") ->
    (1, S, S)`` float in [0, 1]; ``prep.mask(mask)``; ``as_card()`` / ``from_card()``;
    ``read_grey(path)`` (decode by content), ``window_hu``, ``LUNG_WINDOW``. Scoring uses it too.
``datasets``
    ``Sample``; readers ``covid_ct(root)``, ``covid_semiseg(root)``, ``medseg_png(root)``,
    ``synthetic(root, n, size, seed)``; ``SliceDataset(samples, prep, augment, seed,
    with_mask)``; ``load_image``, ``load_mask``, ``stable_split``.
``dicom_data``
    ``dicom_manifest(csv)``, ``worklist_labels(export)`` (format ``triaged-labels/1``),
    ``read_label_export``, ``study_slices``, ``read_hu``.
``metrics``
    ``accuracy``, ``f1``, ``auc``, ``confusion``, ``roc_curve``, ``bootstrap_ci``, ``report``,
    ``dice`` (COVID = 1 is the positive class).
``loop``
    ``Phase`` + ``run_phase`` (resumable, per-epoch checkpoints, torchrun), ``setup_runtime``.
``staged`` / ``semi`` / ``baseline``
    Algorithm 2 (``run_stage``), Algorithm 1 (``train_semi``), Rao et al.'s CNN
    (``train_baseline``), each with its settings dataclass (paper defaults).
``builders``
    ``build_model(architecture)``, ``load_version(model_version)``, ``init_backbone``.
``retrain``
    ``RetrainOptions``, ``retrain(options) -> RetrainResult``, ``evaluate_version``.
``cli``
    ``add_arguments(parser)``, ``run(args, settings) -> exit status`` for ``triaged retrain``.
"""
