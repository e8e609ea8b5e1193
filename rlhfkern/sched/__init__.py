"""The engine: config -> placement -> actors -> loop (DESIGN.md "The engine")."""

from .config import ConfigError, EngineConfig, load_config, parse_config

__all__ = ["ConfigError", "EngineConfig", "load_config", "parse_config"]
