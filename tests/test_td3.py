"""TD3 update: what changes on which step, where gradients go, and the target against a hand computation."""

import itertools

import pytest
import pytorch_lightning as pl
import torch

from lightning_td3.td3 import TD3, clipped_double_q_target, smoothed_target_action

VECTOR = 54


def fixed_batch(size: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randint(0, 256, (size, 4, 84, 84), dtype=torch.uint8, generator=generator),
        "vector": torch.randn(size, VECTOR, generator=generator),
        "action": torch.rand(size, 2, generator=generator) * 2 - 1,
        "reward": torch.randn(size, generator=generator),
        "next_image": torch.randint(0, 256, (size, 4, 84, 84), dtype=torch.uint8, generator=generator),
        "next_vector": torch.randn(size, VECTOR, generator=generator),
        "terminated": (torch.rand(size, generator=generator) < 0.3).float(),
    }


def one_update(module: TD3) -> None:
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=itertools.repeat(fixed_batch()))


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
    reward = torch.tensor([1.0, -2.0, 0.5])
    terminated = torch.tensor([0.0, 1.0, 0.0])
    next_q1 = torch.tensor([10.0, 5.0, -3.0])
    next_q2 = torch.tensor([8.0, 7.0, -1.0])
    target = clipped_double_q_target(reward, terminated, next_q1, next_q2, gamma=0.9)
    # 1 + .9*min(10, 8) = 8.2 ; terminal: -2 ; .5 + .9*min(-3, -1) = -2.2
    torch.testing.assert_close(target, torch.tensor([8.2, -2.0, -2.2]))


def test_target_policy_smoothing_noise_is_clipped_and_actions_stay_in_range():
    torch.manual_seed(0)
    action = torch.zeros(10_000, 2)
    smoothed = smoothed_target_action(action, noise_std=0.2, noise_clip=0.5)
    assert smoothed.abs().max() <= 0.5
    assert 0.15 < smoothed.std() < 0.25
    near_edge = smoothed_target_action(torch.full((1000, 2), 0.9), 0.2, 0.5)
    assert near_edge.max() <= 1.0


@pytest.mark.parametrize("field,value", [("gamma", 1.0), ("tau", 0.0), ("policy_delay", 0)])
def test_bad_hyper_parameters_are_rejected_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        TD3(vector_size=VECTOR, **{field: value})


def test_q_values_line_up_with_rewards_so_the_loss_is_per_sample():
    module = TD3(vector_size=VECTOR, hidden_sizes=(32,))
    batch = fixed_batch()
    q1, q2 = module.critic(batch["image"], batch["vector"], batch["action"])
    assert q1.shape == q2.shape == batch["reward"].shape
    assert module.critic.q1(batch["image"], batch["vector"], batch["action"]).shape == batch["reward"].shape


def test_speed_options_keep_the_checkpoint_layout_and_the_math():
    torch.manual_seed(0)
    eager = TD3(vector_size=VECTOR, hidden_sizes=(32,))
    fast = TD3(vector_size=VECTOR, hidden_sizes=(32,), channels_last=True, compile=True)
    assert fast.state_dict().keys() == eager.state_dict().keys()
    fast.load_state_dict(eager.state_dict())
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
