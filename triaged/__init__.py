"""triaged: a DICOM/PACS-integrated COVID-19 chest-CT triage daemon.

Research software, not a medical device: every output it writes says NOT FOR DIAGNOSTIC USE.
"""

__version__ = "0.1.0"
