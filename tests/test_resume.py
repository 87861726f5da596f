"""Resume: fit to N, stop, `fit --ckpt_path last` to 2N equals one uninterrupted run to 2N."""

import torch

from tests.tiny_run import fit


def load(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    fit(tmp_path / "straight_through", **{"trainer.max_epochs": 2})
    fit(tmp_path / "interrupted", **{"trainer.max_epochs": 1})
    first_half = load(tmp_path / "interrupted")
    fit(tmp_path / "interrupted", "--ckpt_path", "last", **{"trainer.max_epochs": 2})

    expected, resumed = load(tmp_path / "straight_through"), load(tmp_path / "interrupted")
    assert first_half["td3_progress"]["updates"] == 6
    assert resumed["td3_progress"]["updates"] == expected["td3_progress"]["updates"] == 12
    assert resumed["td3_progress"]["env_steps"] == expected["td3_progress"]["env_steps"]
    assert resumed["td3_progress"]["episodes"] == expected["td3_progress"]["episodes"]
    for name, value in expected["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), f"{name} differs after resume"
    for expected_opt, resumed_opt in zip(expected["optimizer_states"], resumed["optimizer_states"]):
        for key, state in expected_opt["state"].items():
            for field, tensor in state.items():
                assert torch.equal(tensor, resumed_opt["state"][key][field]), f"optimizer state {field} differs"
    assert_same_tree(expected["ReplayDataModule"], resumed["ReplayDataModule"], "replay")
    assert_same_tree(expected["callbacks"], resumed["callbacks"], "callbacks")


def assert_same_tree(expected, actual, where: str) -> None:
    if isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same_tree(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where} differs after resume"
    elif not isinstance(expected, bytes):  # pickled env snapshots hold timing-free but identity-laden objects
        assert expected == actual, f"{where} differs after resume"
