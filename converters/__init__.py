"""Host-side converters: Stable Diffusion models -> edge bundles. Needs the [convert] extra."""
