"""Object count's surrogate: duplicates (NMS) against GenEval's rule, and the gradient for absent objects."""

import math

import torch

import geneval_reference
from alignprop.rewards import object_count
from helpers import config


def _cfg(**overrides):
    cfg = config("config/align_prop.py:object_count").reward.object_count
    cfg.update(overrides)
    return cfg


def _images(n=2, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_hard_count_is_genevals_with_nms():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 40, generator=g) * 3 - 1
    boxes = torch.cat([torch.rand(64, 40, 2, generator=g), 0.05 + 0.3 * torch.rand(64, 40, 2, generator=g)], -1)
    for iou in (0.3, 0.5, 0.7):
        ours = object_count.hard_count(logits, 0.1, boxes, iou)
        torch.testing.assert_close(ours, geneval_reference.count(logits, boxes, 0.1, iou), atol=0, rtol=0)
        assert (ours < object_count.hard_count(logits, 0.1)).any()  # duplicates were removed
    # nms_iou=1 is no NMS (GenEval's default max_overlap); the count saturates at GenEval's 16 boxes.
    torch.testing.assert_close(object_count.hard_count(logits, 0.1, boxes, 1.0),
                               (torch.sigmoid(logits) > 0.1).sum(-1).clamp(max=16).float())


def _reward_cfg(**overrides):
    cfg = _cfg(**overrides)
    cfg.lock()
    return cfg


def test_duplicate_boxes_count_once():
    """Two boxes on one object (IoU 0.82) and one on another: 3 without NMS, 2 with it, soft and hard."""
    logits = torch.tensor([[4.0, 3.0, 2.5] + [-9.0] * 13], requires_grad=True)
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.31, 0.31, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]] + [[0.5] * 4] * 13])
    assert object_count.box_iou(boxes)[0, 0, 1] > 0.8
    rewards, info = object_count.count_reward(logits, boxes, torch.tensor([2.0]), _reward_cfg())
    torch.testing.assert_close(info["soft_count"], torch.tensor([2.0]), atol=1e-3, rtol=0)
    assert info["count_exact"].item() == 1 and rewards.item() > -1e-3
    rewards, info = object_count.count_reward(logits, boxes, torch.tensor([2.0]), _reward_cfg(nms_iou=1.0))
    torch.testing.assert_close(info["soft_count"], torch.tensor([3.0]), atol=1e-3, rtol=0)
    assert info["count_exact"].item() == 0
    # Soft NMS: a duplicate counts by the chance that the better box it duplicates is not detected.
    near = torch.tensor([[1.0, 0.0, -9.0]], requires_grad=True)  # threshold 0.5, temperature 1: p = 0.73, 0.5
    soft = object_count.soft_count(near, 0.5, 1.0, boxes[:, :3], 0.5)
    p = torch.sigmoid(torch.tensor([1.0, 0.0]))
    third = torch.sigmoid(torch.tensor(-9.0))  # the box on the other object, not a duplicate
    torch.testing.assert_close(soft.detach(), (p[0] + p[1] * (1 - p[0]) + third)[None], atol=1e-6, rtol=0)
    soft.backward()
    expected = torch.tensor([p[0] * (1 - p[0]) * (1 - p[1]), p[1] * (1 - p[1]) * (1 - p[0])])
    torch.testing.assert_close(near.grad[0, :2], expected, atol=1e-6, rtol=1e-5)


def test_absent_object_gets_a_gradient():
    """Every box far below the threshold (best p = 0.01, 575 at ~1e-3), one object asked for: the rank hinge gives
    the best box a slope of rank_weight per logit; the sigmoid count alone gives 2.7e-4. The value is unchanged."""
    g = torch.Generator().manual_seed(0)
    logits = math.log(1e-3 / (1 - 1e-3)) + 0.3 * torch.randn(1, 576, generator=g)
    logits[0, 0] = math.log(0.01 / 0.99)
    boxes = torch.cat([torch.rand(1, 576, 2, generator=g), 0.05 + 0.2 * torch.rand(1, 576, 2, generator=g)], -1)
    grads, values = [], []
    for weight in (0.0, 0.1):
        x = logits.clone().requires_grad_()
        rewards, _ = object_count.count_reward(x, boxes, torch.tensor([1.0]), _reward_cfg(rank_weight=weight))
        rewards.sum().backward()
        grads.append(x.grad[0])
        values.append(rewards.detach())
    torch.testing.assert_close(values[0], values[1])
    p = torch.sigmoid((logits[0, 0] - math.log(0.1 / 0.9)) / 0.25)
    torch.testing.assert_close(grads[0][0], p * (1 - p) / 0.25, rtol=1e-4, atol=0)
    assert 2.6e-4 < grads[0][0] < 2.8e-4
    assert 0.099 < grads[1][0] < 0.101  # rank_weight x sigmoid(margin - z), z = -9.6
    assert (grads[1][1:].abs() < 1e-3).all()  # the other 575 boxes: pushed down only where near the threshold


def test_absent_object_gets_an_image_gradient_through_the_tiny_detector():
    """The tiny OWL-ViT with its class head shifted so that every box is at p <= 0.01: the pixels' gradient."""
    counter = object_count.build_counter(_cfg(model="tiny"))
    head = counter.detector.class_head
    with torch.no_grad():
        for layer in (head.logit_shift, head.logit_scale):
            layer.weight.zero_()
            layer.bias.zero_()
        head.logit_shift.bias.fill_(-5.6)  # logits = similarity - 5.6 (a cosine in [-1, 1]): p <= 0.01
    norms = []
    for weight in (0.0, 0.1):
        images = _images(2, seed=3).requires_grad_()
        logits, boxes = counter.detect(images, ["apple", "cup"])
        assert (torch.sigmoid(logits) <= 0.01).all(), "premise: nothing detected"
        cfg = _reward_cfg(rank_weight=weight)
        rewards, _ = object_count.count_reward(logits, boxes, torch.tensor([1.0, 2.0]), cfg)
        rewards.sum().backward()
        norms.append(images.grad.flatten(1).norm(dim=1))
    print(f"\nabsent object, |d reward / d pixels| per image: {norms[0].tolist()} -> {norms[1].tolist()}")
    assert (norms[1] > 100 * norms[0]).all()
