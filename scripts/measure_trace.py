"""What a warm start cannot skip: dynamo's (and AOTAutograd's) tracing of the SD 1.5-sized UNet, no-grad and grad.

torch.compile's cache artifacts (`config.speed.compile_cache`) hold the generated kernels; every new process still
traces the Python code of each graph. This times that part alone, on any machine (random weights; backends that
generate no kernels; a small latent, since tracing does not depend on it):

    python scripts/measure_trace.py
"""

import time

import torch
from diffusers import UNet2DConditionModel

from alignprop.families.sd import RANDOM


def timed(label, fn):
    start = time.perf_counter()
    fn()
    print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)


def main():
    unet_config = RANDOM["sd15"][0]
    unet = UNet2DConditionModel(**dict(unet_config, sample_size=8)).requires_grad_(False)
    unet.enable_gradient_checkpointing()  # the default plan's block checkpointing
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 77, unet_config["cross_attention_dim"])
    xg = x.clone().requires_grad_()

    def no_grad():
        with torch.no_grad():
            unet(x, t, ctx)

    def grad():
        unet(xg, t, ctx).sample.sum().backward()

    timed("eager no-grad call (for scale)", no_grad)
    for backend in ("eager", "aot_eager"):  # dynamo alone; dynamo and AOTAutograd's forward/backward tracing
        torch._dynamo.reset()
        unet.compile(backend=backend, dynamic=False)
        timed(f"{backend}: first no-grad call (trace + run)", no_grad)
        timed(f"{backend}: first grad call (trace + run, forward and backward)", grad)


if __name__ == "__main__":
    main()
