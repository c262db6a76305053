"""Semi-supervised fine-tuning (plain PyTorch): the classic algorithms' unlabeled losses (``losses``, ``vat``,
``propagation``), their shared targets and schedules (``targets``), their config (``config``) and the one
objective that the fine-tune stage and the benchmark run (``objective``)."""

from ssl_core.semi.config import ALGORITHMS, SemiConfig
from ssl_core.semi.objective import SemiObjective, UnlabeledPool, pool_subset, semi_views

__all__ = ["ALGORITHMS", "SemiConfig", "SemiObjective", "UnlabeledPool", "pool_subset", "semi_views"]
