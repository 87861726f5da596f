"""TD3 learner throughput: updates/s at batch 256 (actor + twin critics, separate NatureCNNs, policy delay 2).

    python bench/learner.py [--device cpu|cuda] [--updates 200] [--batch-size 256]

Runs the real `TD3.training_step` under a Lightning Trainer (manual optimization, gradient clipping, Polyak
updates) on a fixed pinned batch that is copied to the device every update, as the replay stream does.
"""

import argparse
import itertools
import time

import pytorch_lightning as pl
import torch

from lightning_td3.td3 import TD3

VECTOR_SIZE = 54
WARMUP_UPDATES = 20


def random_batch(batch_size: int, pin: bool) -> dict[str, torch.Tensor]:
    def image():
        return torch.randint(0, 256, (batch_size, 4, 84, 84), dtype=torch.uint8)

    batch = {
        "image": image(), "next_image": image(),
        "vector": torch.randn(batch_size, VECTOR_SIZE), "next_vector": torch.randn(batch_size, VECTOR_SIZE),
        "action": torch.rand(batch_size, 2) * 2 - 1, "reward": torch.randn(batch_size),
        "terminated": torch.zeros(batch_size),
    }
    return {key: value.pin_memory() if pin else value for key, value in batch.items()}


class UpdateClock(pl.Callback):
    def __init__(self, device: str):
        self.device = device
        self.start = self.end = 0.0

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.updates == WARMUP_UPDATES:
            self.start = self._now()

    def on_train_end(self, trainer, module):
        self.end = self._now()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    module = TD3(vector_size=VECTOR_SIZE, log_every_n_updates=10**9, log_images_every_n_updates=10**9)
    clock = UpdateClock(args.device)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=1,
        limit_train_batches=WARMUP_UPDATES + args.updates, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
    )
    # The same pinned host batch every update: TD3 copies it to the device each time, as from the replay stream.
    trainer.fit(module, train_dataloaders=itertools.repeat(random_batch(args.batch_size, pin=args.device == "cuda")))
    updates_per_s = args.updates / (clock.end - clock.start)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch_size}; timed updates {args.updates}")
    print(f"updates_per_s: {updates_per_s:.1f}")


if __name__ == "__main__":
    main()
