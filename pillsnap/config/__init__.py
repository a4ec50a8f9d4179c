"""Configuration: loading, validation, stage overrides and a trained run's saved config."""

from pillsnap.config.loader import ConfigError, check_ranges, check_tf32, config_to_dict, load_config, read_dotenv
from pillsnap.config.run import load_cli_config, load_run_config
from pillsnap.config.stage import apply_stage_overrides, stage_settings

__all__ = ["ConfigError", "apply_stage_overrides", "check_ranges", "check_tf32", "config_to_dict", "load_cli_config",
           "load_config", "load_run_config", "read_dotenv", "stage_settings"]
