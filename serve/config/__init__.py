"""The server's configuration: the settings model and where its values come from."""

from serve.config.cli import build_parser, load_settings, parse_args
from serve.config.settings import ENV_PREFIX, ServerSettings

__all__ = ["ENV_PREFIX", "ServerSettings", "build_parser", "load_settings", "parse_args"]
