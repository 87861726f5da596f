"""TD3 update: what changes on which step, where gradients go, and the target against a hand computation."""

import itertools
import logging

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_td3.td3 as td3_module
from lightning_td3.errors import CheckpointError, ConfigError, TrainingAborted
from lightning_td3.export import ACTOR_ONLY_KEY
from lightning_td3.td3 import (
    TD3,
    clipped_double_q_target,
    random_shift,
    smoothed_target_action,
)

VECTOR = 54


def fixed_batch(size: int = 8, seed: int = 0, n_step: int = 1) -> dict[str, torch.Tensor]:
    """A batch as the replay gives it: transitions spanning 1 to `n_step` steps, rewards 0 after the last."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, n_step + 1, (size,), generator=generator)
    return {
        "image": torch.randint(0, 256, (size, 4, 84, 84), dtype=torch.uint8, generator=generator),
        "vector": torch.randn(size, VECTOR, generator=generator),
        "action": torch.rand(size, 2, generator=generator) * 2 - 1,
        "reward": torch.randn(size, n_step, generator=generator) * (torch.arange(n_step) < steps[:, None]),
        "steps": steps,
        "next_image": torch.randint(0, 256, (size, 4, 84, 84), dtype=torch.uint8, generator=generator),
        "next_vector": torch.randn(size, VECTOR, generator=generator),
        "terminated": (torch.rand(size, generator=generator) < 0.3).float(),
    }


def fit_updates(module: TD3, count: int) -> None:
    """`count` updates in one fit, on the batches fixed_batch(seed=0), fixed_batch(seed=1), ..."""
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=count, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=(fixed_batch(seed=seed) for seed in itertools.count()))


def one_update(module: TD3) -> None:
    fit_updates(module, 1)  # on fixed_batch()


def snapshot(network: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in network.parameters()]


def changed(before: list[torch.Tensor], network: torch.nn.Module) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, network.parameters()))


def grads_nonzero(network: torch.nn.Module) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


def test_actor_step_updates_actor_critic_and_targets_and_both_cnns_learn():
    torch.manual_seed(0)
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,))
    actor, critic = snapshot(module.actor), snapshot(module.critic)
    actor_target, critic_target = snapshot(module.actor_target), snapshot(module.critic_target)

    one_update(module)  # update 0: a policy-delay step

    assert module.updates == 1
    assert changed(actor, module.actor) and changed(critic, module.critic)
    assert changed(actor_target, module.actor_target) and changed(critic_target, module.critic_target)
    assert grads_nonzero(module.actor.cnn), "the actor loss must train the actor's CNN"
    # Targets moved by exactly tau towards the updated online weights.
    tau = module.hparams.tau
    for old, new, online in zip(actor_target, module.actor_target.parameters(), module.actor.parameters()):
        torch.testing.assert_close(new, old + tau * (online.detach() - old))


def test_critic_only_step_leaves_actor_and_targets_alone():
    torch.manual_seed(0)
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,))
    module.updates = 1  # odd update: no actor step with policy_delay 2
    actor, critic, critic_target = snapshot(module.actor), snapshot(module.critic), snapshot(module.critic_target)

    one_update(module)

    assert changed(critic, module.critic)
    assert not changed(actor, module.actor)
    assert not changed(critic_target, module.critic_target)
    assert grads_nonzero(module.critic.cnn), "the critic loss must train the critic's CNN"
    assert all(p.grad is None for p in module.actor.parameters())


def test_actor_and_critic_own_separate_cnns():
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,))
    actor_params = {id(p) for p in module.actor.parameters()}
    assert not actor_params & {id(p) for p in module.critic.parameters()}
    assert not actor_params & {id(p) for p in module.actor_target.parameters()}


def test_clipped_double_q_target_matches_hand_computation():
    reward = torch.tensor([[1.0], [-2.0], [0.5]])
    steps = torch.tensor([1, 1, 1])
    terminated = torch.tensor([0.0, 1.0, 0.0])
    next_q1 = torch.tensor([10.0, 5.0, -3.0])
    next_q2 = torch.tensor([8.0, 7.0, -1.0])
    target = clipped_double_q_target(reward, steps, terminated, next_q1, next_q2, gamma=0.9)
    # 1 + .9*min(10, 8) = 8.2 ; terminal: -2 ; .5 + .9*min(-3, -1) = -2.2
    torch.testing.assert_close(target, torch.tensor([8.2, -2.0, -2.2]))


def test_n_step_target_discounts_each_reward_and_bootstraps_after_the_steps_spanned():
    reward = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    steps = torch.tensor([3, 2, 1])
    terminated = torch.tensor([0.0, 0.0, 1.0])
    next_q = torch.tensor([10.0, 10.0, 10.0])
    target = clipped_double_q_target(reward, steps, terminated, next_q, next_q + 1, gamma=0.5)
    # 1 + .5*2 + .25*4 + .125*10 = 4.25 ; cut short (a time-out or the newest data): 1 + .5*2 + .25*10 = 4.5 ;
    # the episode terminated after the first step: 1
    torch.testing.assert_close(target, torch.tensor([4.25, 4.5, 1.0]))


def test_target_policy_smoothing_noise_is_clipped_and_actions_stay_in_range():
    torch.manual_seed(0)
    action = torch.zeros(10_000, 2)
    smoothed = smoothed_target_action(action, noise_std=0.2, noise_clip=0.5)
    assert smoothed.abs().max() <= 0.5
    assert 0.15 < smoothed.std() < 0.25
    near_edge = smoothed_target_action(torch.full((1000, 2), 0.9), 0.2, 0.5)
    assert near_edge.max() <= 1.0


def offsets_of(shifted: torch.Tensor, images: torch.Tensor, max_shift: int) -> list[tuple[int, int]]:
    """Per stack, the one (row, column) offset whose edge-padded crop of the original stack gives the shifted stack
    (an AssertionError if none or several do)."""
    found = []
    for original, moved in zip(images.numpy(), shifted.numpy()):
        padded = np.pad(original, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)), mode="edge")
        height, width = original.shape[1:]
        matches = [
            (dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)
            if np.array_equal(padded[:, max_shift + dy:max_shift + dy + height, max_shift + dx:max_shift + dx + width],
                              moved)
        ]
        assert len(matches) == 1, matches
        found.append(matches[0])
    return found


def test_random_shift_moves_each_whole_stack_by_its_own_offset_within_the_bound_repeating_the_edges():
    torch.manual_seed(0)
    images = fixed_batch(size=64)["image"]
    shifted = random_shift(images, 4)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    offsets = offsets_of(shifted, images, 4)  # the four frames of a stack moved together, by at most 4 pixels
    assert len(set(offsets)) > 20  # drawn per stack, not once per batch
    assert {dy for dy, _ in offsets} == set(range(-4, 5))
    assert torch.equal(random_shift(images, 0), images)


def test_image_shift_feeds_the_update_shifted_obs_and_next_obs_stacks():
    torch.manual_seed(0)
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,), image_shift=3)
    seen = {}

    def record(name):
        def hook(_, args):
            # The update hands its networks `Frames`; the first call is the critic loss's (the actor's comes later).
            seen.setdefault(name, args[0].image.clone())
        return hook

    module.critic.register_forward_pre_hook(record("image"))
    module.critic_target.register_forward_pre_hook(record("next_image"))
    batch = fixed_batch()
    one_update(module)
    for name in ("image", "next_image"):
        offsets = offsets_of(seen[name], batch[name], 3)
        assert any(offset != (0, 0) for offset in offsets)


def test_the_actor_learns_through_critics_that_read_what_it_cannot():
    """Asymmetric actor-critic: batches that differ only in the critic-only entries ask the same actions of the
    actor, and its update still differs, since the critics it follows judge those actions by those entries."""
    torch.manual_seed(0)
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,), critic_only_vector=2)
    twin = TD3(vector_size=VECTOR, hidden_sizes=(32,), critic_only_vector=2)
    twin.load_state_dict(module.state_dict())
    batch = fixed_batch()
    other_tail = {**batch, "vector": batch["vector"].clone(), "next_vector": batch["next_vector"].clone()}
    other_tail["vector"][:, -2:] += 3.0
    other_tail["next_vector"][:, -2:] += 3.0
    with torch.no_grad():
        actions = module.actor(batch["image"], batch["vector"])
        torch.testing.assert_close(module.actor(batch["image"], other_tail["vector"]), actions, rtol=0, atol=0)
    actor_before = snapshot(module.actor)
    for network, data in ((module, batch), (twin, other_tail)):
        torch.manual_seed(1)  # the same target smoothing noise
        fit_on(network, data)
    assert changed(actor_before, module.actor)
    assert any(not torch.equal(a, b) for a, b in zip(module.actor.parameters(), twin.actor.parameters()))


def test_an_actor_trained_without_the_critic_only_entries_is_refused_naming_the_setting():
    trained = TD3(vector_size=VECTOR, hidden_sizes=(32,), critic_only_vector=2)
    exported = {
        "state_dict": {name: value for name, value in trained.state_dict().items() if name.startswith("actor.")},
        ACTOR_ONLY_KEY: {"hyper_parameters": dict(trained.hparams), "env_steps": 0, "camera": None},
    }
    with pytest.raises(CheckpointError, match=r"shape \(32, 564\), this model \(32, 566\).*'critic_only_vector': 2\}"
                                              r".*'critic_only_vector': 0\}"):
        TD3(vector_size=VECTOR, hidden_sizes=(32,)).on_load_checkpoint(exported)


@pytest.mark.parametrize(
    "field,value",
    [("gamma", 1.0), ("tau", 0.0), ("policy_delay", 0), ("image_shift", -1), ("image_shift", 42),
     ("lr_decay_updates", -1), ("lr_decay_updates", 2.5), ("final_lr_fraction", 1.5),
     ("critic_only_vector", -1), ("critic_only_vector", VECTOR + 1)],
)
def test_bad_hyper_parameters_are_rejected_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        TD3(vector_size=VECTOR, **{field: value})


def test_learning_rates_decay_linearly_over_the_updates_then_hold_and_reach_adam(monkeypatch):
    seen = []
    update = TD3._update

    def recording_update(self, batch, optimizers, actor_step):
        seen.append(tuple(float(optimizer.param_groups[0]["lr"]) for optimizer in optimizers))
        return update(self, batch, optimizers, actor_step)

    monkeypatch.setattr(TD3, "_update", recording_update)
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,), actor_lr=1e-3, critic_lr=2e-3,
                 lr_decay_updates=4, final_lr_fraction=0.25)
    fit_updates(module, 6)
    fractions = [1.0, 0.8125, 0.625, 0.4375, 0.25, 0.25]
    np.testing.assert_allclose(seen, [(1e-3 * f, 2e-3 * f) for f in fractions], rtol=1e-6)

    # Decayed to 0, Adam moves nothing: the rates are the ones the optimizer steps with, and a new fit (as after a
    # resume) goes on from the module's update count, not from the start of the decay.
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,), lr_decay_updates=2, final_lr_fraction=0.0)
    fit_updates(module, 2)
    actor, critic = snapshot(module.actor), snapshot(module.critic)
    fit_updates(module, 2)
    assert module.updates == 4 and not changed(actor, module.actor) and not changed(critic, module.critic)
    assert seen[-2:] == [(0.0, 0.0), (0.0, 0.0)]


def test_q_values_line_up_with_rewards_so_the_loss_is_per_sample():
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,))
    batch = fixed_batch()
    q1, q2 = module.critic(batch["image"], batch["vector"], batch["action"])
    target = clipped_double_q_target(batch["reward"], batch["steps"], batch["terminated"], q1, q2, gamma=0.99)
    assert q1.shape == q2.shape == target.shape == batch["terminated"].shape
    assert module.critic.q1(batch["image"], batch["vector"], batch["action"]).shape == target.shape


def test_speed_options_keep_the_checkpoint_layout_and_the_math():
    torch.manual_seed(0)
    eager = TD3(vector_size=VECTOR, hidden_sizes=(32,), speedups=False)
    eager.use_learner_settings(torch.device("cpu"))
    fast = TD3(vector_size=VECTOR, hidden_sizes=(32,), speedups=False, channels_last=True, compile=True)
    assert fast.state_dict().keys() == eager.state_dict().keys()
    fast.load_state_dict(eager.state_dict())
    fast.use_learner_settings(torch.device("cpu"))
    assert fast.critic.cnn.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = fixed_batch()
    gradients = []
    for module in (eager, fast):
        q1, q2 = module.critic(batch["image"], batch["vector"], batch["action"])
        actor_loss = -module.critic.q1(batch["image"], batch["vector"], module.actor(batch["image"], batch["vector"]))
        (q1.pow(2).mean() + q2.mean() + actor_loss.mean()).backward()
        gradients.append({name: p.grad for name, p in module.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, expected in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], expected, rtol=1e-3, atol=1e-5, msg=name)


def batch_with(**changes) -> dict[str, torch.Tensor]:
    batch = fixed_batch()
    for name, (index, value) in changes.items():
        batch[name][index] = value
    return batch


def fit_on(module: TD3, batch: dict, updates: int = 1, **trainer_args) -> pl.Trainer:
    return fit_on_batches(module, [batch] * updates, **trainer_args)


def fit_on_batches(module: TD3, batches: list[dict], **trainer_args) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=len(batches), limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, **{"logger": False, "enable_checkpointing": False, **trainer_args},
    )
    trainer.fit(module, train_dataloaders=iter(batches))
    return trainer


def untouched(optimizer: torch.optim.Optimizer) -> bool:
    """No step taken: a skipped fused Adam step leaves zero moments and a zero step count (or no state at all)."""
    return all(
        state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        for state in optimizer.state.values()
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"vector": ((0, 3), float("nan"))},  # an observation
        {"next_vector": ((2, 0), float("inf"))},  # a next observation: reaches the loss through the target
        {"reward": (1, float("nan"))},
    ],
)
def test_a_non_finite_batch_skips_the_whole_update_and_logs_it(changes, tmp_path):
    torch.manual_seed(0)
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,))
    module.env_steps = 500  # the x axis of *_vs_env_steps: the run's env steps (this process's, summed)
    networks = (module.actor, module.critic, module.actor_target, module.critic_target)
    before = [snapshot(network) for network in networks]

    trainer = fit_on(module, batch_with(**changes), logger=TensorBoardLogger(tmp_path, name="nan"))

    assert not any(changed(old, network) for old, network in zip(before, networks))
    assert all(untouched(optimizer) for optimizer in trainer.optimizers), "no optimizer may step"
    assert trainer.optimizers[1].state, "the critic's step ran, as a no-op decided on the device"
    assert module.updates == 1 and module.skipped_updates == 1
    events = EventAccumulator(trainer.logger.log_dir).Reload()
    (point,) = events.Scalars("train/skipped_updates_vs_env_steps")
    assert (point.step, point.value) == (500, 1.0)


def test_a_non_finite_actor_loss_skips_the_actor_step_and_the_targets():
    torch.manual_seed(0)
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,))
    with torch.no_grad():
        module.actor.head[-1].bias.fill_(float("nan"))  # the online actor diverged; its target has not
    actor, critic = snapshot(module.actor), snapshot(module.critic)
    targets = snapshot(module.actor_target) + snapshot(module.critic_target)

    trainer = fit_on(module, fixed_batch())

    assert changed(critic, module.critic), "the critic's step came first and stays"
    assert all(torch.equal(old, new) for old, new in zip(actor, module.actor.parameters()) if old.isfinite().all())
    assert untouched(trainer.optimizers[0]) and not untouched(trainer.optimizers[1])
    assert not changed(targets, torch.nn.ModuleList([module.actor_target, module.critic_target]))
    assert module.updates == 1 and module.skipped_updates == 1


def test_a_streak_of_non_finite_updates_stops_the_run_at_the_next_logging_step_with_a_checkpoint(tmp_path):
    """The streak is counted on the device and read on logging steps: a streak that reached the limit between
    two of them stops the run at the next, even if the updates in between were finite again."""
    torch.manual_seed(0)
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,), max_nonfinite_updates=3, log_every_n_updates=4)
    module.updates, module.env_steps = 9, 1234  # logging steps: 12, 16, ...
    poisoned = batch_with(vector=((0, 0), float("nan")))
    batches = [fixed_batch(), poisoned, poisoned, poisoned, fixed_batch(), fixed_batch()]  # updates 9 to 14
    with pytest.raises(TrainingAborted, match="3 updates in a row .* starting at update 10; seen at update 12, "
                                              "env step 1234 .checked every model.log_every_n_updates=4"):
        fit_on_batches(module, batches, default_root_dir=tmp_path, enable_checkpointing=True)
    (checkpoint,) = tmp_path.rglob("last.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["td3_progress"]["skipped_updates"] == 3 and saved["td3_progress"]["updates"] == 13
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values())


def test_a_shorter_streak_of_non_finite_updates_does_not_stop_the_run():
    torch.manual_seed(0)
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,), max_nonfinite_updates=3, log_every_n_updates=2)
    poisoned = batch_with(reward=(0, float("nan")))
    batches = [poisoned, poisoned, fixed_batch(), poisoned, poisoned, fixed_batch(), fixed_batch()]
    fit_on_batches(module, batches)
    assert module.updates == 7 and module.skipped_updates == 4


def reference_td3_updates(module: TD3, batches: list[dict]) -> list[torch.optim.Optimizer]:
    """The eager update as it was before the skip moved onto the device (host-side branch, one `.item()` per
    backward), in plain torch: the anchor the sync-free update must match bit for bit."""
    hp = module.hparams
    actor_optimizer = torch.optim.Adam(module.actor.parameters(), lr=hp.actor_lr, fused=True)
    critic_optimizer = torch.optim.Adam(module.critic.parameters(), lr=hp.critic_lr, fused=True)

    def backward_and_step(optimizer, loss, network) -> bool:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in network.parameters() if p.grad is not None])
        if not torch.isfinite(loss.detach() + grad_norm).item():
            return False
        torch.nn.utils.clip_grad_norm_(list(network.parameters()), hp.max_grad_norm)
        optimizer.step()
        return True

    for update, batch in enumerate(batches):
        with torch.no_grad():
            next_action = smoothed_target_action(
                module.actor_target(batch["next_image"], batch["next_vector"]), hp.policy_noise, hp.noise_clip
            )
            next_q1, next_q2 = module.critic_target(batch["next_image"], batch["next_vector"], next_action)
            target_q = clipped_double_q_target(
                batch["reward"], batch["steps"], batch["terminated"], next_q1, next_q2, hp.gamma
            )
        q1, q2 = module.critic(batch["image"], batch["vector"], batch["action"])
        critic_loss = torch.nn.functional.mse_loss(q1, target_q) + torch.nn.functional.mse_loss(q2, target_q)
        if not backward_and_step(critic_optimizer, critic_loss, module.critic) or update % hp.policy_delay:
            continue
        module.critic.requires_grad_(False)
        actor_loss = -module.critic.q1(batch["image"], batch["vector"], module.actor(batch["image"], batch["vector"]))
        stepped = backward_and_step(actor_optimizer, actor_loss.mean(), module.actor)
        module.critic.requires_grad_(True)
        if stepped:
            with torch.no_grad():
                for online, target in ((module.actor, module.actor_target), (module.critic, module.critic_target)):
                    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), hp.tau)
    return [actor_optimizer, critic_optimizer]


@pytest.mark.parametrize("n_step", [1, 3])
@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "float32"])
def test_the_sync_free_update_matches_the_host_branching_update_bit_for_bit(n_step, speedups):
    torch.manual_seed(0)
    settings = dict(vector_size=VECTOR, hidden_sizes=(32,), layer_norm=True, max_grad_norm=0.5)  # clipping at work
    module = TD3(**settings, speedups=speedups)
    reference = TD3(**settings, speedups=speedups)
    reference.load_state_dict(module.state_dict())
    reference.use_learner_settings(torch.device("cpu"))  # the CNNs' precision and layout the fit will choose
    # updates 0 to 4: three actor + Polyak updates
    batches = [fixed_batch(seed=seed, n_step=n_step) for seed in range(5)]

    torch.manual_seed(1)  # the target smoothing noise, drawn alike on both sides
    trainer = fit_on_batches(module, batches)
    torch.manual_seed(1)
    reference_optimizers = reference_td3_updates(reference, batches)

    assert module.updates == 5 and module.skipped_updates == 0
    for name, value in reference.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name
    for ours, theirs in zip(trainer.optimizers, reference_optimizers):
        for param_state, reference_state in zip(ours.state.values(), theirs.state.values(), strict=True):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(param_state[key], reference_state[key]), key
    assert not changed(snapshot(reference.actor_target), module.actor_target), "targets moved alike"


def test_cuda_graph_is_refused_on_a_cpu_and_with_compile():
    with pytest.raises(ConfigError, match="model.cuda_graph must be false on a CPU .it needs trainer.accelerator: gpu"):
        fit_on(TD3(vector_size=VECTOR, hidden_sizes=(32,), cuda_graph=True), fixed_batch())
    with pytest.raises(ConfigError, match="model.cuda_graph must be false when model.compile is true"):
        TD3(vector_size=VECTOR, cuda_graph=True, compile=True)


def test_a_vector_size_other_than_the_envs_is_refused_before_any_env_runs():
    from datamodules.replay import ReplayDataModule
    from lightning_td3.envs import EnvConfig

    data = ReplayDataModule(env=EnvConfig(num_waypoints=5, observe_leader=True), eval_episodes=1)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match=r"vector_size is 14 but data.env gives vectors of 16 .*observe_leader=True"
                                          r".*set model.init_args.vector_size: 16"):
        trainer.validate(TD3(vector_size=14, hidden_sizes=(16,)), datamodule=data)


def test_data_n_step_from_the_config_reaches_the_update(tmp_path, monkeypatch):
    from tests.tiny_run import fit

    spans = []
    update = TD3._update

    def recording_update(self, batch, optimizers, actor_step):
        spans.append((tuple(batch["reward"].shape), batch["steps"].max().item()))
        return update(self, batch, optimizers, actor_step)

    monkeypatch.setattr(TD3, "_update", recording_update)
    result = fit(tmp_path, "--data.n_step", "3")
    assert result.datamodule.buffer.n_step == 3 and len(spans) == 6
    assert all(shape == (4, 3) and 1 <= most <= 3 for shape, most in spans)
    assert any(most > 1 for _, most in spans), "no sampled transition spanned more than one step"


@pytest.mark.parametrize("native_bf16", [True, False], ids=["cpu_with_bf16", "cpu_without_bf16"])
def test_speedups_pick_bf16_channels_last_only_where_the_cpu_has_bf16_and_say_so(monkeypatch, caplog, native_bf16):
    monkeypatch.setattr(td3_module, "_cpu_has_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    cases = {
        "defaults": ({}, native_bf16),
        "switched off": ({"speedups": False}, False),
        "forced on without speedups": ({"speedups": False, "bf16_cnn": True, "channels_last": True}, True),
        "forced off with speedups": ({"bf16_cnn": False, "channels_last": False}, False),
    }
    for name, (options, fast) in cases.items():
        module = TD3(vector_size=VECTOR, hidden_sizes=(32,), **options)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            chosen = module.use_learner_settings(cpu)
        assert chosen == {"bf16_cnn": fast, "channels_last": fast, "cuda_graph": False}, name
        for network in (module.actor, module.critic, module.actor_target, module.critic_target):
            assert network.cnn.bf16 is fast, name
            assert network.cnn.convs[0].weight.is_contiguous(memory_format=torch.channels_last) is fast, name
        assert ("TD3 learner on cpu: bf16_cnn, channels_last" if fast else "float32 CNNs") in caplog.text, name
        # The switch is named where the learner chose by itself.
        assert ("chosen by model.speedups" in caplog.text) is (native_bf16 and name == "defaults"), name


def test_on_cuda_speedups_choose_the_graphed_update_with_bf16_cnns_only_where_the_graphs_fit(caplog):
    """On a CUDA device bf16 + channels-last were measured faster inside the update's CUDA graphs only: where the
    graphs cannot serve (several processes, a mixed-precision trainer, compile, cuda_graph false) nothing is chosen,
    and the log says why the update stays eager. The choice itself needs no GPU: nothing is moved there."""
    cuda = torch.device("cuda")
    ddp = "under trainer.strategy DDPStrategy with 2 processes (its graphs serve one device; DDP runs the eager update)"
    cases = {
        "defaults": ({}, None, True),
        "several processes": ({}, ddp, False),
        "compile": ({"compile": True}, None, False),
        "graphs switched off": ({"cuda_graph": False}, None, False),
        "switched off": ({"speedups": False}, None, False),
    }
    for name, (options, misfit, fast) in cases.items():
        module = TD3(vector_size=VECTOR, hidden_sizes=(32,), **options)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            chosen = module.use_learner_settings(cuda, graph_misfit=misfit)
        assert chosen == {"bf16_cnn": fast, "channels_last": fast, "cuda_graph": fast}, name
        assert module.critic.cnn.bf16 is fast, name
        chose = "TD3 learner on cuda: bf16_cnn, channels_last, cuda_graph (chosen by model.speedups"
        assert (chose in caplog.text) is fast, name
        assert (f"the update stays eager {ddp}" in caplog.text) is (misfit is not None), name
    forced = TD3(vector_size=VECTOR, hidden_sizes=(32,), cuda_graph=True, bf16_cnn=False, channels_last=False)
    assert forced.use_learner_settings(cuda) == {"bf16_cnn": False, "channels_last": False, "cuda_graph": True}


def test_bf16_cnns_change_an_update_only_as_far_as_bf16_rounding_does():
    """bf16 keeps 8 bits of mantissa (relative rounding 2^-9, about 0.2 %); the CNNs round a few times deep and
    accumulate in float32, so their features, the Q values after them and the critic's gradient direction may move
    by about a percent, not more. Measured: features 0.5 %, Q 0.7 %, gradient cosine 0.9988; the bounds leave
    room for other CPUs' kernels, and a wrong cast (a bf16 head, bf16 targets, unscaled pixels) breaks them."""
    torch.manual_seed(0)
    full = TD3(vector_size=VECTOR, speedups=False)
    fast = TD3(vector_size=VECTOR, speedups=False, bf16_cnn=True, channels_last=True)
    fast.load_state_dict(full.state_dict())
    for module in (full, fast):
        module.use_learner_settings(torch.device("cpu"))
    batch = fixed_batch()
    image, vector, action = batch["image"], batch["vector"], batch["action"]

    def relative(new: torch.Tensor, reference: torch.Tensor) -> float:
        return ((new - reference).norm() / reference.norm()).item()

    with torch.no_grad():
        assert relative(fast.critic.cnn(image), full.critic.cnn(image)) < 0.02
        assert relative(fast.critic(image, vector, action)[0], full.critic(image, vector, action)[0]) < 0.03
    gradients = []
    for module in (full, fast):
        q1, q2 = module.critic(image, vector, action)
        (q1.pow(2).mean() + q2.pow(2).mean()).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in module.critic.parameters()]))
    assert F.cosine_similarity(gradients[0], gradients[1], dim=0) > 0.99
