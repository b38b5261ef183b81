from setuptools import find_packages, setup

setup(
    name="alignprop",
    version="0.1.0",
    description="Align text-to-image diffusion models to differentiable rewards by backpropagation (AlignProp).",
    packages=find_packages(include=["alignprop", "alignprop.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.32",
        "transformers>=4.45",
        "accelerate>=1.0",
        "peft>=0.15",
        "ml_collections",
        "absl-py",
        "wandb",
        "tensorboard",
        "open_clip_torch>=2.26",
        "numpy",
        "pillow",
        "matplotlib",
        "safetensors",
        "tqdm",
    ],
    # scikit-image ships the photographs (and needs scipy, used for Spearman) of the JPEG-surrogate ranking test.
    extras_require={"test": ["pytest", "scikit-image", "scipy"], "8bit": ["bitsandbytes"]},
)
