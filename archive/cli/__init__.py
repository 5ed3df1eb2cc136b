"""The `pacsvault` command line (click). One module per verb group."""
