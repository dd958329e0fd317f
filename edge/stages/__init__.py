"""The stages of a generation, one job each, in the order the pipeline runs them:

- text.py     text conditioning: weight (edge.prompts), window, encode; (prompt, negative) -> the UNet's context
- start.py    the start latents: seeded noise, or an image encoded and noised to a strength
- inpaint.py  inpainting: what the denoiser needs to repaint only under a mask, and the paste-back
- denoise.py  the denoiser: one UNet call (whole graph or chunks), guidance, the denoising generator
- decode.py   latents -> image: whole, or in tiles sharing GroupNorm statistics under a tight budget
- preview.py  latents -> a rough picture with no decoder run, for progress previews

Each takes the bundle's `Graphs` (edge.graphs) for its sessions; the memory plan (edge.plan) says what stays
resident. A new feature is a new stage file or an option of one of these, not a branch in the pipeline.
"""
