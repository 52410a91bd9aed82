"""The one error type of a refused configuration (every entry point prints it as one message, exit 2)."""


class ConfigError(ValueError):
    """A model or job configuration DeepSeek-V4 cannot run; the message names the fix."""
