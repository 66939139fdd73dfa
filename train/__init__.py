"""lowbit's trainer: Hydra config -> typed RunConfig -> validate -> DeepSpeed engine -> step loop."""
