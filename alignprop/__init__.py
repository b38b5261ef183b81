"""alignprop: align text-to-image diffusion models to differentiable rewards (AlignProp, arXiv 2310.03739)."""

__version__ = "0.1.0"
