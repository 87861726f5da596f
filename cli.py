"""Command line: `python cli.py fit|validate|test --config configs/<file>.yaml`; `--help` lists every option."""

import sys
import warnings

from pytorch_lightning.cli import LightningCLI

from datamodules.replay import ReplayDataModule
from lightning_td3.driving_module import DrivingModule
from lightning_td3.errors import UserError

# TD3 pulls its batches itself (exact resume needs sampling at update time); Lightning calls that experimental.
warnings.filterwarnings("ignore", message=".*`dataloader_iter`.*")


def main(args=None) -> LightningCLI:
    return LightningCLI(
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
