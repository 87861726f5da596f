"""A fit small enough for a test: a few dozen env steps and updates through the real CLI, env and callbacks."""

from pathlib import Path

import yaml

import cli

TINY_ENV = {"scenario": 1, "layout": "curvy", "route_length_m": 120.0, "max_steps": 12, "num_waypoints": 5}


def tiny_config(run_dir: Path, **overrides) -> Path:
    config = {
        "seed_everything": 7,
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 6,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir / "logs"), "name": "tiny"},
            },
            "callbacks": [
                {"class_path": "lightning_td3.collector.Collector",
                 "init_args": {"learning_starts": 30, "async_envs": False}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run_dir / "checkpoints"), "every_n_epochs": 1,
                               "save_top_k": -1, "save_last": True}},
            ],
        },
        "model": {
            "class_path": "lightning_td3.td3.TD3",
            "init_args": {"hidden_sizes": [16], "log_every_n_updates": 2,
                          "log_images_every_n_updates": 6},
        },
        "data": {
            "num_envs": 2,
            "buffer_capacity": 500,
            "batch_size": 4,
            "eval_episodes": 1,
            "env": dict(TINY_ENV),
        },
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]  # e.g. trainer.callbacks.0.init_args
        node[leaf] = value
    path = run_dir / "tiny.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def fit(run_dir: Path, *extra: str, **overrides):
    return cli.main(["fit", "--config", str(tiny_config(run_dir, **overrides)), *extra])
