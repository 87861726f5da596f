"""Library messages that the documented commands would print and that no user can act on, filtered one by one.

Each filter matches one message only; everything else, from Lightning and torch alike, still reaches the user.
"""

from __future__ import annotations

import logging
import warnings

import lightning_utilities.core.rank_zero as rank_zero
import pytorch_lightning  # noqa: F401  (imported first: it points rank_zero's logger at its own, see below)

# Lightning's own "💡 Tip: ... try installing litlogger / litmodels" advertisements, logged at INFO on every run.
ADVERTISEMENT = "💡 Tip:"


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTISEMENT)


def quiet_library_noise() -> None:
    # pytorch_lightning 2.6's own pytree helper still builds torch's deprecated LeafSpec (torch >= 2.10).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    # TD3 pulls its batches itself (exact resume needs sampling at update time); Lightning calls that experimental.
    warnings.filterwarnings("ignore", message=".*`dataloader_iter`.*")
    # rank_zero_info logs through `rank_zero.log`, which lightning_fabric and then pytorch_lightning replace with their
    # own logger on import: the one in place once pytorch_lightning is imported is the one used.
    rank_zero.log.addFilter(_DropAdvertisements())


def quiet_evaluation_noise() -> None:
    """For validate and test, which restore a checkpoint's weights only: Lightning's advice to pass the callbacks that
    wrote it concerns resuming a fit (their states), not evaluating it."""
    warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")
