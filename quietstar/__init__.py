"""quietstar: Quiet-STaR continued pretraining for Hugging Face causal LMs."""

from quietstar.cli_config import ConfigError
from quietstar.config import QuietStarConfig
from quietstar.model import QuietStarModel, QuietStarOutput
from quietstar.optim import build_param_groups

__all__ = ["ConfigError", "QuietStarConfig", "QuietStarModel", "QuietStarOutput", "build_param_groups"]
__version__ = "0.1.0"
