"""Model packages, prediction and post-processing."""
