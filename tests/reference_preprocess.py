"""The official preprocessing of each reward, on PIL images, written independently of alignprop (test references).

Each function takes an HxWx3 uint8 array and returns the normalized [1,3,S,S] tower input that the
reward's official code computes.
"""

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def photo(name, height, width):
    """A scikit-image photograph (RGB uint8), resized with PIL to height x width."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    return np.array(Image.fromarray(np.ascontiguousarray(array[..., :3])).resize((width, height), Image.BICUBIC))


def as_tensor(array):
    """uint8 HxWx3 -> [1,3,H,W] float in [0, 1] (what the rewards receive)."""
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def transformers_clip(array, size, mean=OPENAI_MEAN, std=OPENAI_STD):
    """transformers' CLIPImageProcessor with PIL (PickScore, CLIP score/torchmetrics, ddpo's aesthetic, MPS)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_mean=mean, image_std=std)
    return processor(images=Image.fromarray(array), return_tensors="pt").pixel_values


def torchvision_clip(array, size, mean=OPENAI_MEAN, std=OPENAI_STD):
    """`Resize(size, BICUBIC), CenterCrop(size), ToTensor, Normalize` on a PIL image (BLIP / ImageReward)."""
    transform = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                           T.Normalize(mean, std)])
    return transform(Image.fromarray(array))[None]


def resize_max_size(image, max_size, fill=0):
    """HPSv2's `ResizeMaxSize.forward` (hpsv2/src/open_clip/transform.py, vendored from open_clip 2.x)."""
    width, height = image.size
    scale = max_size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        image = TF.resize(image, new_size, InterpolationMode.BICUBIC)
        pad_h = max_size - new_size[0]
        pad_w = max_size - new_size[1]
        image = TF.pad(image, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=fill)
    return image


def hpsv2(array, size, mean=OPENAI_MEAN, std=OPENAI_STD):
    """HPSv2's evaluation transform: ResizeMaxSize, convert to RGB, ToTensor, Normalize."""
    image = resize_max_size(Image.fromarray(array).convert("RGB"), size)
    return T.Normalize(mean, std)(T.ToTensor()(image))[None]


def owlvit(array, size, mean=OPENAI_MEAN, std=OPENAI_STD):
    """transformers' OwlViTImageProcessor with PIL: bicubic to size x size."""
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    processor = OwlViTImageProcessorPil(size={"height": size, "width": size}, crop_size={"height": size, "width": size},
                                        image_mean=mean, image_std=std)
    return processor(images=Image.fromarray(array), return_tensors="pt").pixel_values


def owlv2(array, size, mean=OPENAI_MEAN, std=OPENAI_STD):
    """transformers' Owlv2ImageProcessor (pad to square, Gaussian antialias, bilinear)."""
    from transformers import Owlv2ImageProcessor

    processor = Owlv2ImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    return processor(images=Image.fromarray(array), return_tensors="pt").pixel_values
