"""Everything that speaks DICOM: the SCP, the spool, series selection, results, export."""
