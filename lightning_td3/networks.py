"""Actor and twin critic for visual TD3: each owns a NatureCNN over the 4-frame stack plus an MLP head.

The actor and the critic never share a CNN: the critic's loss alone trains the critic's CNN and the actor's
loss alone trains the actor's (as SB3's TD3 with `share_features_extractor=False`), so neither loss can
drag the other's features around. The critic's two Q heads do share the critic's CNN.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_td3.envs.config import FRAME_STACK

LEAKY_SLOPE = 0.01


def _init_he(layer: nn.Conv2d | nn.Linear) -> None:
    nn.init.kaiming_normal_(layer.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
    nn.init.zeros_(layer.bias)


class Frames:
    """A batch of uint8 (B, 4, 84, 84) frame stacks, scaled to [-1, 1] once for all the CNNs that read it.

    One TD3 update feeds the observation to the critic, the actor and the critic's Q1, and the next observation to
    both targets. Scaling, casting and reordering a stack is memory-bound work that costs about as much as a small
    convolution on a CPU, so each is done once per update and layout rather than once per network.
    """

    def __init__(self, image: torch.Tensor):
        # Scaling in the network rather than in the replay buffer or data path keeps images uint8 (4x smaller)
        # until they reach the device, and makes it impossible to feed a net pre-scaled pixels by accident.
        if image.dtype != torch.uint8:
            raise TypeError(f"NatureCNN expects a uint8 image; got {image.dtype}")
        self.image = image
        self._scaled: dict[tuple[torch.dtype, torch.memory_format], torch.Tensor] = {}

    def scaled(self, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
        """The stacks in [-1, 1] as `dtype` in `memory_format`: computed in float32 then cast, so the bf16 values are
        those autocast would give the float32 pixels."""
        key = (dtype, memory_format)
        if key not in self._scaled:
            # In place after the one copy: the same arithmetic without two more copies.
            pixels = self.image.contiguous(memory_format=memory_format).float().div_(127.5).sub_(1.0)
            self._scaled[key] = pixels.to(dtype)
        return self._scaled[key]


class NatureCNN(nn.Module):
    """uint8 (B, 4, 84, 84) frame stack -> (B, feature_size) features, the DQN Nature encoder with LeakyReLU.

    `bf16`: run the convolutions and the feature layer under bfloat16 autocast (features are returned as float32).
    Its input is a uint8 tensor or the `Frames` an update shares between networks.
    """

    def __init__(self, in_channels: int = FRAME_STACK, feature_size: int = 512, bf16: bool = False):
        super().__init__()
        self.bf16 = bf16
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=8, stride=4),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Flatten(),
        )
        self.linear = nn.Sequential(nn.Linear(64 * 7 * 7, feature_size), nn.LeakyReLU(LEAKY_SLOPE))
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                _init_he(layer)

    def forward(self, image: torch.Tensor | Frames) -> torch.Tensor:
        frames = image if isinstance(image, Frames) else Frames(image)
        # The layout of the first convolution's weights (`channels_last` turns the whole module): handed the pixels
        # in it, the convolution does not reorder them itself.
        channels_last = self.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        pixels = frames.scaled(torch.bfloat16 if self.bf16 else torch.float32, layout)
        # bf16 for the convolutions and the feature layer only, where nearly all the compute is; the features go
        # on in float32, so heads, Q values, TD targets and losses keep full precision. No cast cache: each weight is
        # cast once per forward anyway, and a cache must not outlive a CUDA graph capture (TD3's cuda_graph).
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            features = self.linear(self.convs(pixels))
        return features.float()


def mlp(in_size: int, hidden_sizes: tuple[int, ...], out_size: int, layer_norm: bool = False) -> nn.Sequential:
    """Linear [-> LayerNorm] -> LeakyReLU per hidden size, then a plain Linear output layer."""
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        hidden = nn.Linear(in_size, size)
        _init_he(hidden)
        layers += [hidden, nn.LayerNorm(size)] if layer_norm else [hidden]
        layers.append(nn.LeakyReLU(LEAKY_SLOPE))
        in_size = size
    # The output layer keeps PyTorch's default (smaller) init: a He-scaled output would start the actor's
    # tanh near saturation and the critics' Q far from 0.
    layers.append(nn.Linear(in_size, out_size))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """(image, vector) -> action in (-1, 1)^action_size.

    `critic_only_vector`: the vector's last entries that the actor never reads (asymmetric actor-critic: what the
    critics may learn from in training but the driving policy must do without).
    """

    def __init__(
        self,
        vector_size: int,
        action_size: int = 2,
        hidden_sizes: tuple[int, ...] = (256, 256),
        feature_size: int = 512,
        layer_norm: bool = False,
        bf16_cnn: bool = False,
        critic_only_vector: int = 0,
    ):
        super().__init__()
        self.read_vector_size = vector_size - critic_only_vector
        self.cnn = NatureCNN(feature_size=feature_size, bf16=bf16_cnn)
        self.head = mlp(feature_size + self.read_vector_size, tuple(hidden_sizes), action_size, layer_norm)

    def forward(self, image: torch.Tensor | Frames, vector: torch.Tensor) -> torch.Tensor:
        read = vector[:, : self.read_vector_size]
        return torch.tanh(self.head(torch.cat([self.cnn(image), read], dim=1)))


class TwinCritic(nn.Module):
    """Two Q heads over one critic CNN: (image, vector, action) -> (q1, q2), each (B,) like the rewards."""

    def __init__(
        self,
        vector_size: int,
        action_size: int = 2,
        hidden_sizes: tuple[int, ...] = (256, 256),
        feature_size: int = 512,
        layer_norm: bool = False,
        bf16_cnn: bool = False,
    ):
        super().__init__()
        self.cnn = NatureCNN(feature_size=feature_size, bf16=bf16_cnn)
        head_input = feature_size + vector_size + action_size
        self.q1_head = mlp(head_input, tuple(hidden_sizes), 1, layer_norm)
        self.q2_head = mlp(head_input, tuple(hidden_sizes), 1, layer_norm)

    @staticmethod
    def _head_input(features: torch.Tensor, vector: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.cat([features, vector, action], dim=1)

    def forward(
        self, image: torch.Tensor | Frames, vector: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        head_input = self._head_input(self.cnn(image), vector, action)
        return self.q1_head(head_input).squeeze(-1), self.q2_head(head_input).squeeze(-1)

    def q1(self, image: torch.Tensor | Frames, vector: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Q1 only, for the actor loss (TD3 maximises Q1 alone).

        The actor's gradient reaches Q1 through `action` alone and the critic's CNN sees only the observation,
        so its features are computed without autograd: the same actor gradient without a backward pass through
        the critic's CNN (which the actor loss must not train anyway; SB3's `q1_forward` does the same).
        """
        with torch.no_grad():
            features = self.cnn(image)
        return self.q1_head(self._head_input(features, vector, action)).squeeze(-1)
