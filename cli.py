"""Command line: `python cli.py fit|validate|test --config configs/<file>.yaml`; `--help` lists every option."""

import sys
import warnings

from pytorch_lightning.cli import LightningCLI

from datamodules.replay import ReplayDataModule
from lightning_td3.driving_module import DrivingModule
from lightning_td3.errors import UserError
from lightning_td3.fault_tolerance import FaultTolerance

# TD3 pulls its batches itself (exact resume needs sampling at update time); Lightning calls that experimental.
warnings.filterwarnings("ignore", message=".*`dataloader_iter`.*")


class DrivingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always on, configurable under `fault_tolerance:`.
        parser.add_lightning_class_args(FaultTolerance, "fault_tolerance")


def main(args=None) -> LightningCLI:
    return DrivingCLI(
        DrivingModule,
        ReplayDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        # TD3 builds its two optimizers itself (model.actor_lr / model.critic_lr).
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
