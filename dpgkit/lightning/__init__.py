"""Lightning pieces: restore whole datasets on 1 to N GPUs (`dpgkit predict RECIPE.yaml`).

Importing this package imports Lightning; nothing else in dpgkit does.
"""

from .datamodule import RestorationDataModule, ShardSampler
from .module import Prior, RestorationModule
from .writer import ImageProgressBar, PredictionWriter

__all__ = ["ImageProgressBar", "PredictionWriter", "Prior", "RestorationDataModule", "RestorationModule",
           "ShardSampler"]
