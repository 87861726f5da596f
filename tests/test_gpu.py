"""CUDA paths: batches pinned and moved without blocking, updates on the GPU, checkpoints that load on a CPU."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_td3.envs import DrivingEnv, EnvConfig
from lightning_td3.td3 import TD3, random_shift
from tests.tiny_run import TINY_ENV, fit

pytestmark = pytest.mark.gpu


def test_fit_on_gpu_then_act_on_cpu(tmp_path):
    result = fit(tmp_path, "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--data.pin_memory", "true")
    # The defaults on one GPU: the graphed update with bf16 CNNs, batches gathered from the replay's copy there.
    assert result.model.graphs_update and result.model._graphed_update.graphs
    assert result.model.critic.cnn.bf16 and result.datamodule.device_replay is not None
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["td3_progress"]["updates"] == 6
    assert checkpoint["td3_progress"]["rng"]["cuda"], "the CUDA RNG state must be saved for an exact resume"

    module = TD3(vector_size=14, hidden_sizes=(16,))
    module.load_state_dict(checkpoint["state_dict"])
    env = DrivingEnv(EnvConfig(**TINY_ENV))
    observation, _ = env.reset(seed=0)
    action = module.policy().act(observation, env)
    assert action.shape == (2,) and abs(action).max() <= 1.0


def test_sampling_on_the_device_trains_exactly_as_host_sampling(tmp_path, monkeypatch):
    """The replay copied to the GPU hands the update the very batches the host would: the same weights come out."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same conv kernels in both fits
    gpu = ("--trainer.accelerator", "gpu", "--trainer.devices", "1")
    weights = []
    for name, on_device in (("host", "false"), ("device", "true")):
        result = fit(tmp_path / name, *gpu, "--data.sample_on_device", on_device, "--data.n_step", "3")
        assert (result.datamodule.device_replay is not None) == (on_device == "true")
        checkpoint = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert checkpoint["td3_progress"]["updates"] == 6
        weights.append(checkpoint["state_dict"])
    host, device = weights
    for name, value in host.items():
        torch.testing.assert_close(device[name], value, msg=name)


def test_actor_acts_on_gpu_batches():
    module = TD3(vector_size=14, hidden_sizes=(16,)).cuda()
    observation = {
        "image": torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8).numpy(),
        "vector": torch.randn(3, 14).numpy(),
    }
    actions = module.act(observation)
    assert actions.shape == (3, 2) and abs(actions).max() <= 1.0


def cuda_batches(count: int, size: int = 16) -> list[dict[str, torch.Tensor]]:
    from tests.test_td3 import fixed_batch

    return [fixed_batch(size, seed=seed, n_step=3) for seed in range(count)]


def fit_on_gpu(module: TD3, batches: list[dict]) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=len(batches), limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=iter(batches))
    return trainer


@pytest.mark.parametrize(
    "speedups",
    [{}, {"channels_last": True, "bf16_cnn": True}, {"lr_decay_updates": 6, "final_lr_fraction": 0.1}],
    ids=["plain", "channels_last_bf16", "lr_decay"],  # lr_decay: the graphs must read each update's learning rates
)
def test_cuda_graph_update_matches_the_eager_update(speedups, monkeypatch):
    """Eager warm-up, then both graphs (critic only; critic + actor + Polyak) recorded and replayed, a NaN batch
    among the replays: the weights, targets, Adam state and counters must come out as the eager update's."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same conv kernels on both sides
    batches = cuda_batches(10)
    batches[7] = {**batches[7], "reward": batches[7]["reward"].clone()}
    batches[7]["reward"][0] = float("nan")  # update 7, replayed: a skipped critic-only update
    settings = dict(vector_size=54, hidden_sizes=(32,), layer_norm=True, max_grad_norm=1.0, log_every_n_updates=3,
                    policy_noise=0.0, **speedups)  # no smoothing noise: the graph's RNG offsets are its own
    torch.manual_seed(0)
    eager = TD3(**settings)
    graphed = TD3(**settings, cuda_graph=True)
    graphed.load_state_dict(eager.state_dict())
    before = {name: value.clone() for name, value in eager.state_dict().items()}

    eager_trainer = fit_on_gpu(eager, batches)
    graphed_trainer = fit_on_gpu(graphed, batches)

    assert graphed._graphed_update.graphs.keys() == {True, False}, "both kinds of update were replayed"
    assert graphed.updates == eager.updates == 10 and graphed.skipped_updates == eager.skipped_updates == 1
    assert graphed_trainer.global_step == eager_trainer.global_step == 15, "Lightning counts the graphs' steps"
    for name, value in eager.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} never moved"
        torch.testing.assert_close(graphed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # Adam steps: the actor's at updates 0, 2, 4, 6, 8; the critic's at every update but the skipped one.
    for ours, theirs, steps in zip(graphed_trainer.optimizers, eager_trainer.optimizers, (5, 9)):
        for param_state, eager_state in zip(ours.state.values(), theirs.state.values(), strict=True):
            assert param_state["step"] == eager_state["step"] == steps
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(param_state[key], eager_state[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("first_fit", ["gpu", "cpu"])
def test_cuda_graph_fit_resumes_from_its_checkpoint(tmp_path, first_fit):
    """A graphed run checkpoints capturable Adam state, a CPU run Adam state that is not; either way the resumed
    graphed fit records its graphs afresh and goes on."""
    graph = ("--trainer.accelerator", "gpu", "--trainer.devices", "1", "--model.init_args.cuda_graph", "true")
    fit(tmp_path, *(graph if first_fit == "gpu" else ("--trainer.accelerator", "cpu")))
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    result = fit(tmp_path, *graph, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"),
                 **{"trainer.max_epochs": 2})
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["td3_progress"]["updates"] == 6 and second["td3_progress"]["updates"] == 12
    assert result.trainer.global_step == second["global_step"] == 18
    assert result.model._graphed_update.graphs, "the resumed fit replays graphs"
    critic_steps = [state["step"] for state in second["optimizer_states"][1]["state"].values()]
    assert all(step == 12 for step in critic_steps)
    assert all(torch.isfinite(value).all() for value in second["state_dict"].values())


def test_random_shift_recorded_in_a_cuda_graph_draws_new_offsets_on_every_replay():
    """model.image_shift inside a graphed update: each replay must shift anew, not repeat the recorded offsets."""
    from tests.test_td3 import fixed_batch, offsets_of

    images = fixed_batch(size=32)["image"].cuda()
    side = torch.cuda.Stream()  # warm up off the capture stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        random_shift(images, 4)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        shifted = random_shift(images, 4)
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append(offsets_of(shifted.cpu(), images.cpu(), 4))
    assert replays[0] != replays[1]
