"""Storage backends behind one interface (sites now, the object tier later)."""
