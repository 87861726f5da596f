"""Lightning datamodules: the replay stream that feeds the TD3 learner."""
