"""Benchmarks against the peers (Orthanc, dcmtk) and physical limits; see bench/README.md."""
