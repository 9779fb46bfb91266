"""Study-level validation of a pipeline on a site's own labelled studies.

``triaged validate`` scores each labelled study through the very entry point the daemon's
worker and ``triaged score`` use (:meth:`triaged.processing.PipelineProcessor.score`), so the
figures it reports (AUC, sensitivity/specificity at each priority level, calibration) are
those of the decisions the daemon would make on those studies. Intervals come from a
patient-level bootstrap: studies of one patient are not independent, and resampling them
one by one would give intervals that are too narrow.

:mod:`.rendition` writes the COVID-CT public images as DICOM CT studies (clearly marked as
renditions of published figures), so the public test split can be run through the same path.
"""
