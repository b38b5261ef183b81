import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "requirements.txt")) as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="alignprop",
    version="0.1.0",
    description="Align text-to-image diffusion models to differentiable rewards by backpropagation (AlignProp).",
    packages=find_packages(include=["alignprop", "alignprop.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"test": ["pytest", "pytest-xdist", "scikit-image", "scipy"], "8bit": ["bitsandbytes"]},
)
