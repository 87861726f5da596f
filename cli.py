"""Command line: `python cli.py fit|validate|test --config configs/<file>.yaml`; `--help` lists every option."""

import sys

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from datamodules.replay import ReplayDataModule
from lightning_td3 import runs
from lightning_td3.config_files import check_config_files
from lightning_td3.driving_module import DrivingModule
from lightning_td3.envs import EnvConfig
from lightning_td3.errors import StopRequested, UserError
from lightning_td3.fault_tolerance import FaultTolerance
from lightning_td3.quiet import quiet_evaluation_noise, quiet_library_noise

quiet_library_noise()


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

    def parse_arguments(self, parser, args) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        check_config_files(argv)  # a YAML error named with its file
        self.config = parser.parse_args(runs.with_trained_settings(argv))
        # Before Lightning reads the checkpoint (it loads its hyper-parameters right after parsing).
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is not None and config.get("ckpt_path"):
            config.ckpt_path, checkpoint = runs.resolve_checkpoint(config)
            if subcommand == "fit":
                runs.continue_logging(config, checkpoint)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.model.get("init_args")
        if model is not None and "vector_size" in model and model.vector_size is None:  # derived, not repeated
            model.vector_size = EnvConfig(**config.data.env.as_dict()).vector_size
        if self.subcommand in ("validate", "test"):  # evaluation prints its table and leaves no run folder behind
            trainer = self.config[self.subcommand].trainer
            trainer.logger = False
            self.save_config_callback = None
            # Nor a checkpoint: without a ModelCheckpoint of the config's own, Lightning's default one would only
            # read the restored checkpoint's callback state and warn that its folder differs.
            if not any("ModelCheckpoint" in str(callback.get("class_path")) for callback in trainer.callbacks or []):
                trainer.enable_checkpointing = False
            quiet_evaluation_noise()

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        # First, so that its on_fit_start, which marks the end of setup and restore, comes before the warm-up.
        callbacks = self.trainer.callbacks
        callbacks.insert(0, callbacks.pop(callbacks.index(self._fault_tolerance())))

    def fit(self, model, **kwargs) -> None:
        created = runs.new_log_dir(self.trainer)
        try:
            self._fault_tolerance().check_outputs(self.trainer, self.model, self.datamodule)
            with runs.resuming_in_place(kwargs.get("ckpt_path")):
                self.trainer.fit(model, **kwargs)
        except BaseException:
            if not self._fault_tolerance().fit_started:
                runs.remove_unused_log_dir(created)
            raise

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(runs.fit_summary(self.trainer), flush=True)

    def _fault_tolerance(self) -> FaultTolerance:
        (fault_tolerance,) = (c for c in self.trainer.callbacks if isinstance(c, FaultTolerance))
        return fault_tolerance


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
