"""DICOM network services (pynetdicom) and Part 10 handling."""
