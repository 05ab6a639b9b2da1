"""The one training loop for every method."""
