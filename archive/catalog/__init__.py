"""The catalog: what was received, and where every copy of it lives."""
