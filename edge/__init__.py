"""edge-diffusion: Stable Diffusion on the devices people own. The runtime never imports torch.

    from edge import Pipeline
    pipe = Pipeline.load("bundle/")
    result = pipe.generate("a red circle on a blue background", steps=20, seed=0)
"""

import os
import sys

__version__ = "0.1.0"


def _unshadow_checkout() -> None:
    """Take this checkout's root off sys.path (`python -m ...` run from the checkout puts it first).

    Its `kernels/` and `converters/` folders are imported as `edge.kernels` and `edge.converters`; seen from the
    root they would shadow the PyPI packages of those names, and transformers (>= 5.25 depends on Hugging Face's
    `kernels`) then imports our folder in its place. Nothing else is imported from the root: `edge` itself comes
    from the installed (editable) package.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = all(os.path.isfile(os.path.join(root, *part)) for part in
               (("pyproject.toml",), ("kernels", "__init__.py"), ("converters", "__init__.py")))
    if ours:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]


_unshadow_checkout()


def __getattr__(name: str):
    # Lazy, so `import edge.converters...` on the host does not start onnxruntime sessions machinery.
    if name in ("Pipeline", "Result"):
        from edge import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")


__all__ = ["Pipeline", "Result", "__version__"]
