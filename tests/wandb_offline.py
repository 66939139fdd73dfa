"""Read a W&B offline run file (``run-<id>.wandb``) back, without a server.

The reader lives in ``train.review.wandb_files`` (offline reports use it too); this module
re-exports it under the name the tests have always imported.
"""

from train.review.wandb_files import find_run_files, iter_records, read_run

__all__ = ["find_run_files", "iter_records", "read_run"]
