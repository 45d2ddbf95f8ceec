"""DICOM networking and pixel handling: receive, intake, send, decode."""
