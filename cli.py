"""Command line: `python cli.py fit|validate|test --config configs/....yaml` (LightningCLI; `--help` lists every option)."""

import warnings

from pytorch_lightning.cli import LightningCLI

from datamodules.replay import ReplayDataModule
from lightning_td3.driving_module import DrivingModule

# TD3 pulls its batches itself (exact resume needs sampling at update time); Lightning calls that experimental.
warnings.filterwarnings("ignore", message=".*`dataloader_iter` argument.*")


def main(args=None) -> LightningCLI:
    return LightningCLI(
        DrivingModule,
        ReplayDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
