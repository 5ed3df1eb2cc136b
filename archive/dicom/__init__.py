"""DICOM: Part 10 files and data set walking here; the network engine in ``net``."""
