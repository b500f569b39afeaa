"""quietstar: latent-reasoning training for Hugging Face causal LMs: Quiet-STaR and Coconut.

    quietstar/core/        what both methods share (base model class, loading, typed configs, text data)
    quietstar/quiet_star/  Quiet-STaR: thoughts after every token, mixing head, REINFORCE
    quietstar/coconut/     Coconut: continuous thoughts and their curriculum
    quietstar/training/    the two recipes and the DeepSpeed engine, checkpoints and logs they share
    quietstar/evaluation/  zero-shot tasks, perplexity reports
"""

from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.model import CoconutModel, CoconutOutput
from quietstar.core.cli_config import ConfigError
from quietstar.core.optim import build_param_groups
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.quiet_star.model import QuietStarModel, QuietStarOutput

__all__ = [
    "CoconutConfig",
    "CoconutModel",
    "CoconutOutput",
    "ConfigError",
    "QuietStarConfig",
    "QuietStarModel",
    "QuietStarOutput",
    "build_param_groups",
]
__version__ = "0.2.0"
