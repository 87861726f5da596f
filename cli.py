"""Command line: `python cli.py fit|validate|test --config configs/<file>.yaml`; `--help` lists every option."""

import sys
import warnings

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from datamodules.replay import ReplayDataModule
from lightning_td3.driving_module import DrivingModule
from lightning_td3.errors import StopRequested, UserError
from lightning_td3.fault_tolerance import FaultTolerance

# TD3 pulls its batches itself (exact resume needs sampling at update time); Lightning calls that experimental.
warnings.filterwarnings("ignore", message=".*`dataloader_iter`.*")


class ShortErrorParser(LightningArgumentParser):
    """A bad option or config key (unknown, wrong type) ends with one message naming it, not pages of usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse trying alternatives: it catches this itself
            super().error(message, ex)
        sys.exit(f"error: {message}\n(`python cli.py <fit|validate|test> --help` lists every option)")


class DrivingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always on, configurable under `fault_tolerance:`.
        parser.add_lightning_class_args(FaultTolerance, "fault_tolerance")

    def before_fit(self) -> None:
        (fault_tolerance,) = (c for c in self.trainer.callbacks if isinstance(c, FaultTolerance))
        fault_tolerance.check_outputs(self.trainer, self.model, self.datamodule)


def main(args=None, run: bool = True) -> LightningCLI:
    return DrivingCLI(
        DrivingModule,
        ReplayDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_class=ShortErrorParser,
        # TD3 builds its two optimizers itself (model.actor_lr / model.critic_lr).
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
    except StopRequested as stop:  # SIGINT/SIGTERM: a checkpoint was written, nothing went wrong
        print(stop, file=sys.stderr)
