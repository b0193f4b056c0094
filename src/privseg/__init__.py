"""privseg: privacy-preserving medical image segmentation.

Pipeline: data → train / federated (privacy inside) → unlearn → audit → report.
"""

from privseg.errors import BudgetExceededError, CheckpointError, ConfigError, DataError, PrivsegError

__version__ = "0.1.0"
__all__ = ["BudgetExceededError", "CheckpointError", "ConfigError", "DataError", "PrivsegError", "__version__"]
