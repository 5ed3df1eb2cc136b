"""pacsvault: the daemon (config, catalog, DICOM services, CLI)."""
