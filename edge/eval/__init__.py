"""Image analysis for evaluating generated images (no learned models)."""
