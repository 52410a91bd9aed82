from .args import ConfigError, DeepSeekV4ModelArgs
from .model import DeepSeekV4Model

__all__ = ["ConfigError", "DeepSeekV4ModelArgs", "DeepSeekV4Model"]
