"""Experiment drivers on top of the plugin: sweeps of fairseq-train runs (`sweep`), their reports
(`report`) and seed statistics (`stats`). Library code of the `scripts/` entry points; not a user dir,
registers nothing."""
