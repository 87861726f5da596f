"""The progress bar of a run: Lightning's rich one, with the run's counters shown as whole numbers."""

from __future__ import annotations

from pytorch_lightning.callbacks import RichProgressBar

from lightning_td3.collector import COUNTERS


# Lightning's own: the logger's version number.
WHOLE_NUMBERS = (*COUNTERS, "v_num")


class ProgressBar(RichProgressBar):
    """`RichProgressBar` showing env steps, episodes and the run's version as `1301`, not `1301.000`."""

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        # As text: the bar formats every number, ints too, with three decimals (and logged values are floats).
        return {
            name: str(int(value)) if name in WHOLE_NUMBERS and isinstance(value, (int, float)) else value
            for name, value in metrics.items()
        }
