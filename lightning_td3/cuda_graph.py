"""The TD3 update replayed from CUDA graphs (`TD3(cuda_graph=True)`).

An eager update from pixels is bound by the host: hundreds of small kernel launches (three NatureCNNs forward and
backward, the heads, clipping, Adam, Polyak) for about 1 ms of GPU arithmetic. Recorded once as a CUDA graph, the
whole update is one launch. This follows PyTorch's "whole network capture" recipe: a few eager warm-up updates on a
side stream (lazy initialisation, optimizer state, .grad tensors), then capture, with the batch copied into static
buffers before every replay. Two graphs, since the policy delay makes two kinds of update: critic only, and critic
+ actor + Polyak. The update itself must not sync with the host (`TD3._update` decides skips on the device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

WARMUP_UPDATES = 3  # eager updates before capture, as PyTorch's recipe does; at least one of each kind runs too


class GraphedUpdate:
    """Runs `update(batch, optimizers, actor_step)` eagerly for the first updates of a fit, then from graphs.

    `optimizers` are the LightningOptimizers: the eager updates step through them; the graphs record the torch
    optimizers' own steps, and every replay tells Lightning about the steps it made (its `global_step`).
    """

    def __init__(self, update: Callable, optimizers: Sequence) -> None:
        self.update = update
        self.optimizers = list(optimizers)  # (actor, critic), as TD3.configure_optimizers returns them
        self.kinds_run: set[bool] = set()  # the kinds of update (actor_step) run eagerly so far
        self.eager_updates = 0
        self.batch: dict[str, torch.Tensor] | None = None  # the static input of both graphs
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, object]] = {}  # actor_step -> (graph, its outputs)

    def __call__(self, batch: dict[str, torch.Tensor], actor_step: bool):
        if self.eager_updates < WARMUP_UPDATES or actor_step not in self.kinds_run:
            return self._warm_up(batch, actor_step)
        if actor_step not in self.graphs:
            self._capture(batch, actor_step)
        self._fill(batch)
        graph, outputs = self.graphs[actor_step]
        graph.replay()
        actor_optimizer, critic_optimizer = self.optimizers
        for optimizer in [critic_optimizer, actor_optimizer] if actor_step else [critic_optimizer]:
            # What LightningOptimizer.step does around a step, which here the graph made.
            optimizer._on_before_step()
            optimizer._on_after_step()
        return outputs

    def _warm_up(self, batch: dict[str, torch.Tensor], actor_step: bool):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.update(batch, self.optimizers, actor_step)
        torch.cuda.current_stream().wait_stream(side)
        self.eager_updates += 1
        self.kinds_run.add(actor_step)
        return outputs

    def _capture(self, batch: dict[str, torch.Tensor], actor_step: bool) -> None:
        if self.batch is None:
            self.batch = {name: torch.empty_like(value) for name, value in batch.items()}
        graph = torch.cuda.CUDAGraph()
        torch_optimizers = [optimizer.optimizer for optimizer in self.optimizers]
        # Records without running: the replay that follows does this update. thread_local: other threads (the
        # DataLoader's pin-memory thread) may go on calling CUDA meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.update(self.batch, torch_optimizers, actor_step)
        self.graphs[actor_step] = (graph, outputs)

    def _fill(self, batch: dict[str, torch.Tensor]) -> None:
        for name, static in self.batch.items():
            if batch[name].shape != static.shape:
                raise ValueError(
                    f"model.cuda_graph replays updates recorded for batches of one shape: {name} was "
                    f"{tuple(static.shape)}, now {tuple(batch[name].shape)}"
                )
            static.copy_(batch[name], non_blocking=True)
