"""Mirrored writes to the online sites, repair of missing copies."""
