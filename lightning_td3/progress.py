"""The progress bar of a run: Lightning's rich one, with the run's counters shown as whole numbers."""

from __future__ import annotations

from pytorch_lightning.callbacks import RichProgressBar

from lightning_td3.collector import COUNTERS


class ProgressBar(RichProgressBar):
    """`RichProgressBar` showing env steps and episodes as `1301`, not `1301.000` (logged values are floats)."""

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        # As text: the bar formats every number, ints too, with three decimals.
        return {name: str(int(value)) if name in COUNTERS else value for name, value in metrics.items()}
