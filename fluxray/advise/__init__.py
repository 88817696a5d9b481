"""The trainer that tells you what to change: config advice, time estimates, "is it done?",
and `fluxray doctor`. Pure functions of a config and a run's records, torch-free to import."""
