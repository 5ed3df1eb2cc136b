"""DR volumes: encrypted, cataloged tape and LTFS volumes (docs/formats/dr-volume.md)."""
