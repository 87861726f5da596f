"""Sampling on the training device: a copy of the replay storage kept there (`data.sample_on_device`).

A sampled batch of 256 frame stacks is about 14 MB of uint8 pixels. Gathered on the host, it is copied into
pinned memory and then to the GPU on every update; from a copy of the storage on the GPU, only the sampled places
cross (a few KB), and the copy is kept current with the slots written since the last batch (one frame and vector
per env step). The places come from `ReplayBuffer.sample_slots` with the same random generator, so the batches are
the very ones host sampling would give: a run trains the same either way, and resumes the same.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pytorch_lightning.utilities import rank_zero_info

from lightning_td3.errors import ConfigError, require
from lightning_td3.replay import ReplayBuffer, gather_transitions

# The parts of the storage a batch is gathered from (which slots are valid is decided on the host), and the dtype
# of each on the device; `terminated` goes to the update as a float.
COPIED = {
    "frames": torch.uint8,
    "vectors": torch.float32,
    "actions": torch.float32,
    "rewards": torch.float32,
    "terminated": torch.float32,
}


def device_replay_for(buffer: ReplayBuffer, device: torch.device, requested: bool | None) -> DeviceReplay | None:
    """The copy of `buffer` that `data.sample_on_device` asks for on the training `device`, or None (sampling on the
    host). True: a copy, refused on a CPU, where it would only double the replay's memory. None: a copy on a CUDA
    device where it takes at most half of the memory free there (batches are the same either way; the rest is left
    to the networks and other processes). The choice is logged."""
    if requested is False or (requested is None and device.type != "cuda"):
        return None
    require(device.type != "cpu", "data.sample_on_device", "false when training on a CPU", requested)
    needed = copy_bytes(buffer)
    if requested is None:
        free = torch.cuda.mem_get_info(device)[0]
        if needed > free / 2:
            rank_zero_info(
                f"Replay batches gathered on the host: a copy on {device} ({needed / 1e9:.1f} GB) would take more "
                f"than half of its {free / 1e9:.1f} GB free (data.sample_on_device true insists)"
            )
            return None
    rank_zero_info(
        f"Replay batches gathered on {device} from a {needed / 1e9:.1f} GB copy of the replay there "
        "(data.sample_on_device false keeps them on the host)"
    )
    return DeviceReplay(buffer, device)


def copy_bytes(buffer: ReplayBuffer) -> int:
    """Device memory a `DeviceReplay` of `buffer` allocates."""
    arrays = buffer.storage()
    return sum(math.prod(arrays[name].shape) * dtype.itemsize for name, dtype in COPIED.items())


class DeviceReplay:
    """A copy of `buffer`'s storage on `device`, from which `sample` gathers batches there.

    The whole capacity is allocated at once (about 7.3 KB per transition), so a buffer too big for the device
    fails here, naming the setting, and not hours into a run.
    """

    def __init__(self, buffer: ReplayBuffer, device: torch.device | str):
        self.buffer = buffer
        self.device = torch.device(device)
        try:
            self.storage = {
                name: torch.zeros(array.shape, dtype=COPIED[name], device=self.device)
                for name, array in self._copied_arrays().items()
            }
        except torch.OutOfMemoryError as error:
            raise ConfigError(
                f"data.sample_on_device: the replay copy ({buffer.capacity:,} transitions, about "
                f"{copy_bytes(buffer) / 1e9:.1f} GB) does not fit on {self.device}; lower data.buffer_capacity or set "
                "data.sample_on_device false"
            ) from error
        self._generation = None  # the buffer's storage generation the copy holds
        self._written = buffer.written  # the buffer's slots written per ring when the copy was last brought up

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """`ReplayBuffer.sample(batch_size, rng)`'s batch, as tensors on the device."""
        self.sync()
        rings, *slot_arrays, spanned = self.buffer.sample_slots(batch_size, rng)
        places = np.concatenate([rings[:, None], *slot_arrays, spanned], axis=1, dtype=np.int64)
        places = torch.from_numpy(places).to(self.device, non_blocking=True)  # one small copy for all the indices
        stack, n_step = slot_arrays[0].shape[1], spanned.shape[1]
        stack_slots, next_stack_slots, reward_slots, spanned = places[:, 1:].split([stack, stack, n_step, n_step], 1)
        return gather_transitions(
            self.storage, places[:, 0], stack_slots, next_stack_slots, reward_slots, spanned.bool()
        )

    def sync(self) -> None:
        """Bring the copy up to the buffer: the slots changed since the last sync, or all after a reload."""
        if self._generation != self.buffer.generation:
            filled = self.buffer.filled_slots()
            for name, array in self._copied_arrays().items():
                self.storage[name][:, :filled].copy_(torch.from_numpy(array[:, :filled]))
            self._generation = self.buffer.generation
        else:
            rings, slots = self.buffer.slots_changed_since(self._written)
            if rings.size:
                places = (torch.from_numpy(rings).to(self.device), torch.from_numpy(slots).to(self.device))
                for name, array in self._copied_arrays().items():
                    values = torch.from_numpy(array[rings, slots]).to(self.device, COPIED[name])
                    self.storage[name].index_put_(places, values)
        self._written = self.buffer.written

    def _copied_arrays(self) -> dict[str, np.ndarray]:
        """The buffer's storage arrays that the copy holds."""
        return {name: array for name, array in self.buffer.storage().items() if name in COPIED}
