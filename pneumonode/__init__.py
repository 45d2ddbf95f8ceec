"""pneumonode: a DICOM node that segments pneumothorax on chest radiographs."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
