"""edge-diffusion: Stable Diffusion on the devices people own. The runtime never imports torch.

    from edge import Pipeline
    pipe = Pipeline.load("bundle/")
    result = pipe.generate("a red circle on a blue background", steps=20, seed=0)
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import edge.converters...` on the host does not start onnxruntime sessions machinery.
    if name in ("Pipeline", "Result"):
        from edge import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")


__all__ = ["Pipeline", "Result", "__version__"]
