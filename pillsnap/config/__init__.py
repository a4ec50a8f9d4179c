"""Configuration: loading, validation and stage overrides."""

from pillsnap.config.loader import ConfigError, config_to_dict, load_config, read_dotenv
from pillsnap.config.stage import apply_stage_overrides, stage_settings

__all__ = ["ConfigError", "apply_stage_overrides", "config_to_dict", "load_config", "read_dotenv", "stage_settings"]
