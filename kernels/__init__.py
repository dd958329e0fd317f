"""Graph kernels (attention variants) chosen by explicit arguments at convert time."""
