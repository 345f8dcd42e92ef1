"""MIND reading and validation, tokenising, the synthetic generator, and the dataset artifact."""
