"""Core ML target: Stable Diffusion as `.mlpackage`s that Apple's Swift package (ml-stable-diffusion) loads.

ane.py         the Neural-Engine module family ((B, C, 1, S) layout, 1x1 convolutions, channel layer norm,
               split-einsum attention), built from diffusers modules' weights
unet.py        the UNet as named stages, whole or cut into chunks by weight size
vae.py         the VAE with its mid-block attention in the same layout
components.py  the four graphs with Apple's names, inputs and outputs
compress.py    coremltools.optimize weight compression, and its torch-side PSNR
convert.py     parity -> precision -> trace -> coremltools -> compress -> save; the manifest section
reference.py   edge's pipeline with torch modules as graphs: the yardstick for the Mac check and benchmarks
"""
