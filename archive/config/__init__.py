"""Configuration: one TOML file, validated at start-up (see default.toml)."""
from archive.config.load import config_path_from, load_settings
from archive.config.schema import Settings

__all__ = ["Settings", "load_settings", "config_path_from"]
