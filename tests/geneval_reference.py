"""GenEval's counting rule (djghosh13/geneval, evaluation/evaluate_images.py), written for the tests with
torchvision's NMS: independent of alignprop's own greedy NMS."""

import torch


def count(logits, boxes, threshold, iou):
    """GenEval's counting rule with torchvision's NMS: the 16 best boxes above the threshold, greedy NMS at `iou`."""
    from torchvision.ops import box_convert, nms

    counts = []
    for image_logits, image_boxes in zip(logits.detach(), boxes.detach()):
        scores = torch.sigmoid(image_logits)
        best = scores.argsort(descending=True)[:16]
        best = best[scores[best] > threshold]
        counts.append(len(nms(box_convert(image_boxes[best], "cxcywh", "xyxy"), scores[best], iou)))
    return torch.tensor(counts, dtype=torch.float32)
