"""DICOM result objects: Segmentation and secondary-capture overlay."""
