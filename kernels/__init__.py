"""Triton kernels of fastfoof's hot operations, installed as `fastfoof.kernels`."""

if __name__ == "kernels":
    # Imported as a top-level `kernels` (Python puts the working directory first on sys.path, so from a
    # clone's root), this folder would shadow the `kernels` distribution that transformers and peft import:
    # the import goes to whatever else on sys.path has that name, or fails as if this folder were not there.
    import sys
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _spec = PathFinder.find_spec(__name__, [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    sys.modules[__name__] = module_from_spec(_spec)  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(sys.modules[__name__])
