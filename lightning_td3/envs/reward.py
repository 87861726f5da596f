"""The seed's weighted reward, shaped so that standing still is never the best policy.

Every term but progress is a penalty in [-1, 0] per step (times its weight), and progress pays about +1 per
step at the target speed. So standing still costs `efficiency` every step and earns nothing, while driving the
route at the target speed earns `progress` every step; a crash ends the episode with `crash_penalty`.
The seed's system rewarded lane keeping even at rest and collapsed to standing still: not here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from lightning_td3.envs.config import RewardConfig

# How far from its lane's centre line, toward a neighbouring lane, the ego pays the whole `alongside` charge: a car
# centred in a 3.5-4 m lane beside it is then within half a metre of touching it.
ALONGSIDE_FULL_AT_M = 1.5


@dataclass
class RewardTerms:
    efficiency: float
    lane_keeping: float
    comfort: float
    safety: float
    progress: float
    headway: float
    closing: float
    alongside: float
    total: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _shortfall(gap_m: float | None, rate_mps: float | None, seconds: float) -> float:
    """How far the time to cover `gap_m` at `rate_mps` is below `seconds`: 0 at or above it, with no gap, or at no
    positive rate; 1 at no gap."""
    if gap_m is None or rate_mps is None or rate_mps <= 0:
        return 0.0
    return min(max(1.0 - gap_m / (rate_mps * seconds), 0.0), 1.0)


def compute_reward(
    weights: RewardConfig,
    *,
    speed_mps: float,
    target_speed_mps: float,
    progress_step_m: float,
    dt: float,
    lateral_offset_m: float,
    off_road_distance_m: float,
    heading_error_rad: float,
    action_change: np.ndarray,
    crashed: bool,
    gap_ahead_m: float | None = None,
    speed_ahead_mps: float | None = None,
    gaps_beside_m: tuple[float | None, float | None] = (None, None),
) -> RewardTerms:
    """`gap_ahead_m`: bumper-to-bumper distance to the car ahead in the ego's lane (None: none in sight); the headway
    term reads it, and with that car's `speed_ahead_mps`, the closing term. `gaps_beside_m`: the same to the nearer
    of the cars ahead and behind in the lane to the ego's left and in the lane to its right (None: no car in sight,
    or no lane); only the alongside term reads it."""
    efficiency = -min(abs(speed_mps - target_speed_mps) / target_speed_mps, 1.0)
    lane_keeping = -min(
        0.5 * abs(lateral_offset_m) / off_road_distance_m + 0.5 * abs(heading_error_rad) / (math.pi / 2), 1.0
    )
    # Jerk proxy: how much the commands moved since the last step; each component spans at most 2.
    comfort = -float(np.abs(action_change).sum()) / 4.0
    safety = -weights.crash_penalty if crashed else 0.0

    def time_gap_shortfall(gap_m: float | None) -> float:
        """How far the time gap (gap / ego speed) is below headway_s: 0 at or above it, or no car; 1 touching."""
        return _shortfall(gap_m, speed_mps, weights.headway_s)

    headway = -time_gap_shortfall(gap_ahead_m)
    # The time to collision: the gap over the speed at which the ego closes in on the car ahead.
    closing_mps = None if speed_ahead_mps is None else speed_mps - speed_ahead_mps
    closing = -_shortfall(gap_ahead_m, closing_mps, weights.closing_s)
    # lateral_offset_m > 0: left of the lane's centre line, toward the lane on the left (gaps_beside_m[0]).
    toward = (max(lateral_offset_m, 0.0), max(-lateral_offset_m, 0.0))
    alongside = -max(
        min(offset / ALONGSIDE_FULL_AT_M, 1.0) * time_gap_shortfall(gap) for offset, gap in zip(toward, gaps_beside_m)
    )
    progress = progress_step_m / (target_speed_mps * dt)
    if weights.progress_up_to_target_speed:
        progress = min(progress, 1.0)
    weighted = dict(
        efficiency=weights.efficiency * efficiency,
        lane_keeping=weights.lane_keeping * lane_keeping,
        comfort=weights.comfort * comfort,
        safety=weights.safety * safety,
        progress=weights.progress * progress,
        headway=weights.headway * headway,
        closing=weights.closing * closing,
        alongside=weights.alongside * alongside,
    )
    weighted = {name: float(value) for name, value in weighted.items()}
    return RewardTerms(**weighted, total=sum(weighted.values()))
