import math

import pytest
import torch
from torch import nn

from lightning_td3.networks import LEAKY_SLOPE, Actor, NatureCNN, TwinCritic

VECTOR_SIZE = 54


def batch(size: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (size, 4, 84, 84), dtype=torch.uint8, generator=generator)
    vector = torch.randn(size, VECTOR_SIZE, generator=generator)
    action = torch.rand(size, 2, generator=generator) * 2 - 1
    return image, vector, action


def test_output_shapes():
    image, vector, action = batch()
    assert NatureCNN()(image).shape == (5, 512)
    assert Actor(VECTOR_SIZE)(image, vector).shape == (5, 2)
    critic = TwinCritic(VECTOR_SIZE)
    q1, q2 = critic(image, vector, action)
    assert q1.shape == q2.shape == (5,)
    torch.testing.assert_close(critic.q1(image, vector, action), q1)


def test_custom_sizes_and_layer_norm():
    image, vector, action = batch()
    actor = Actor(VECTOR_SIZE, action_size=3, hidden_sizes=(64,), feature_size=128, layer_norm=True)
    assert actor(image, vector).shape == (5, 3)
    assert sum(isinstance(m, nn.LayerNorm) for m in actor.modules()) == 1
    critic = TwinCritic(VECTOR_SIZE, hidden_sizes=(32, 16), layer_norm=True)
    assert critic(image, vector, action)[0].shape == (5,)
    assert sum(isinstance(m, nn.LayerNorm) for m in critic.modules()) == 4
    assert not any(isinstance(m, nn.LayerNorm) for m in Actor(VECTOR_SIZE).modules())


def test_the_actor_never_reads_the_critic_only_entries_which_the_critics_do():
    image, vector, action = batch()
    actor = Actor(VECTOR_SIZE, critic_only_vector=2)
    critic = TwinCritic(VECTOR_SIZE)
    assert actor.head[0].in_features == 512 + VECTOR_SIZE - 2
    other_tail = vector.clone()
    other_tail[:, -2:] += 3.0
    torch.testing.assert_close(actor(image, other_tail), actor(image, vector), rtol=0, atol=0)
    assert not torch.allclose(critic(image, other_tail, action)[0], critic(image, vector, action)[0])
    changed_route = vector.clone()
    changed_route[:, -3] += 3.0  # the entry before the tail is still the actor's
    assert not torch.allclose(actor(image, changed_route), actor(image, vector))


def test_uint8_pixels_are_scaled_to_minus_one_one_inside_the_network():
    cnn = NatureCNN()
    seen = []
    cnn.convs[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    image = torch.zeros(2, 4, 84, 84, dtype=torch.uint8)
    image[0] = 255
    image[1, :, :, :42] = 128
    cnn(image)
    first_layer_input = seen[0]
    assert first_layer_input.dtype == torch.float32
    assert torch.all(first_layer_input[0] == 1.0)
    assert torch.all(first_layer_input[1, :, :, 42:] == -1.0)
    torch.testing.assert_close(first_layer_input[1, :, :, :42], torch.full((4, 84, 42), 128 / 127.5 - 1))


def test_float_images_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        NatureCNN()(torch.zeros(1, 4, 84, 84))


def test_channels_last_input_gives_the_same_features():
    image, _, _ = batch()
    cnn = NatureCNN()
    torch.testing.assert_close(cnn(image.contiguous(memory_format=torch.channels_last)), cnn(image))


def test_actor_output_is_inside_the_action_box_and_not_saturated_at_init():
    image, vector, _ = batch(size=64)
    actor = Actor(VECTOR_SIZE)
    assert torch.all(actor(image, vector).abs() < 0.95)
    # float32 tanh rounds to exactly +-1 for huge pre-activations, so only the closed box holds there.
    assert torch.all(actor(image, vector * 1e4).abs() <= 1)


def test_actor_and_critic_have_separate_cnns_and_the_q_heads_share_one():
    actor, critic = Actor(VECTOR_SIZE), TwinCritic(VECTOR_SIZE)
    actor_cnn = {id(p) for p in actor.cnn.parameters()}
    critic_cnn = {id(p) for p in critic.cnn.parameters()}
    assert actor_cnn and critic_cnn and not actor_cnn & critic_cnn
    assert sum(isinstance(m, NatureCNN) for m in critic.modules()) == 1
    assert {id(p) for p in critic.q1_head.parameters()}.isdisjoint(id(p) for p in critic.q2_head.parameters())


def test_cnn_init_is_he_for_leaky_relu_with_zero_biases():
    torch.manual_seed(0)
    cnn = NatureCNN()
    gain = math.sqrt(2.0 / (1 + LEAKY_SLOPE**2))
    layers = [m for m in cnn.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 4
    for layer in layers:
        fan_in = layer.weight[0].numel()
        assert layer.weight.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.1)
        assert abs(layer.weight.mean().item()) < 0.05 * gain / math.sqrt(fan_in)
        assert torch.all(layer.bias == 0)


def test_gradients_reach_the_cnns():
    image, vector, action = batch()
    actor, critic = Actor(VECTOR_SIZE), TwinCritic(VECTOR_SIZE)

    q1, q2 = critic(image, vector, action)
    (q1 + q2).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.cnn.parameters())

    critic.zero_grad()
    (-critic.q1(image, vector, actor(image, vector)).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.cnn.parameters())


def test_the_actor_loss_gives_the_full_graphs_actor_gradient_without_a_backward_through_the_critics_cnn():
    image, vector, _ = batch()
    torch.manual_seed(0)
    actor, critic = Actor(VECTOR_SIZE), TwinCritic(VECTOR_SIZE)

    (-critic(image, vector, actor(image, vector))[0].mean()).backward()  # Q1 through the whole graph
    full_graph = [p.grad.clone() for p in actor.parameters()]
    actor.zero_grad()
    critic.zero_grad(set_to_none=True)
    (-critic.q1(image, vector, actor(image, vector)).mean()).backward()

    for expected, param in zip(full_graph, actor.parameters()):
        torch.testing.assert_close(param.grad, expected)
    assert all(p.grad is None for p in critic.cnn.parameters())


def test_bf16_cnn_computes_in_bf16_and_hands_float32_features_on():
    image, vector, action = batch()
    torch.manual_seed(0)
    cnn = NatureCNN(bf16=True)
    conv_outputs = []
    cnn.convs[0].register_forward_hook(lambda module, inputs, output: conv_outputs.append(output))
    features = cnn(image)
    assert conv_outputs[0].dtype == torch.bfloat16 and features.dtype == torch.float32
    torch.manual_seed(0)
    full_precision = NatureCNN()(image)
    torch.testing.assert_close(features, full_precision, rtol=0.05, atol=0.05)
    q1, _ = TwinCritic(VECTOR_SIZE, bf16_cnn=True)(image, vector, action)
    assert q1.dtype == torch.float32
