"""End-to-end visual TD3 for autonomous driving, as a PyTorch Lightning module."""
