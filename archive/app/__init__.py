"""Use cases: composition and the work the CLI and the daemon both run (one floor above
tiers/, replication/ and dr/, below the edges)."""
