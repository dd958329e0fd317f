"""The default model: a tiny Stable Diffusion (CLIP text encoder, conditional UNet, KL autoencoder)
trained on procedural scenes (`edge.eval.scenes`) on a CPU in under an hour. Needs the [convert] extra."""
