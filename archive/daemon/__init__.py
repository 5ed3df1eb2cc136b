"""The daemon edge: `pacsvault serve`, its DICOM listener, HTTP server, TLS and the
APScheduler wiring."""
