"""Expected calibration error and per-class accuracy of one evaluation set.

Accumulated on the evaluation device, batch by batch, without a host synchronisation per batch
(every update is a device-side scatter-add); the host reads the sums once at the end.

ECE follows Guo et al. (2017): 15 equal-width confidence bins over (0, 1], a prediction's confidence
is the top-1 probability of the softmax of the fp32 logits, a confidence c falls in bin
ceil(15 c) - 1 (bins are closed on the right), and ECE = sum over bins of |correct_b - conf_b| / N,
where correct_b and conf_b are the bin's number of correct predictions and sum of confidences.
It is recorded in percentage points, like accuracy.
"""

from __future__ import annotations

import torch

ECE_BINS = 15


class CalibrationAccumulator:
    """Device-side sums for ECE and per-class accuracy of one class set."""

    def __init__(self, n_classes: int, device: torch.device, bins: int = ECE_BINS) -> None:
        self.bins = bins
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.bin_count = torch.zeros(bins, dtype=dtype, device=device)
        self.bin_conf = torch.zeros(bins, dtype=dtype, device=device)
        self.bin_correct = torch.zeros(bins, dtype=dtype, device=device)
        self.class_total = torch.zeros(n_classes, dtype=torch.long, device=device)
        self.class_correct = torch.zeros(n_classes, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: `logits` (N, C), `labels` (N,), both on the accumulator's device."""
        probs = torch.softmax(logits.float(), dim=-1)
        conf, pred = probs.max(dim=-1)
        correct = pred == labels
        index = (torch.ceil(conf * self.bins).long() - 1).clamp_(0, self.bins - 1)
        dtype = self.bin_count.dtype
        self.bin_count.index_add_(0, index, torch.ones_like(conf, dtype=dtype))
        self.bin_conf.index_add_(0, index, conf.to(dtype))
        self.bin_correct.index_add_(0, index, correct.to(dtype))
        self.class_total.index_add_(0, labels, torch.ones_like(labels))
        self.class_correct.index_add_(0, labels, correct.long())

    def summary(self) -> dict[str, object]:
        """`ece` (percentage points) and `per_class_accuracy` (%, class order; a class without
        test images gets null). One host transfer."""
        total = float(self.bin_count.sum())
        ece = 100.0 * float((self.bin_correct - self.bin_conf).abs().sum()) / total if total else 0.0
        correct = self.class_correct.tolist()
        count = self.class_total.tolist()
        per_class = [round(100.0 * c / n, 4) if n else None for c, n in zip(correct, count)]
        return {"ece": ece, "per_class_accuracy": per_class}


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE (percentage points) of a whole set at once; the accumulator's one-batch case."""
    acc = CalibrationAccumulator(logits.shape[-1], logits.device, bins)
    acc.update(logits, labels)
    return float(acc.summary()["ece"])


__all__ = ["ECE_BINS", "CalibrationAccumulator", "expected_calibration_error"]
