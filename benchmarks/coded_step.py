"""Cost of the exact-linear coded step against one backward of the weighted losses.

    python benchmarks/coded_step.py [--repeats 9] [--partitions 3] [--batch 32]

A rank of the cyclic code computes ``sum_j W[i, j] g_j`` over its r partitions. Two ways, on the
same CNN (374K parameters, CIFAR-sized inputs) and the same data, single process:

* ``weighted loss`` (before): r forwards, one backward of ``sum_j w_j loss_j`` (the weights enter
  the backward kernels, so under bf16 or TF32 each holder's copy of ``g_j`` rounds differently);
* ``exact-linear`` (now): for each partition but the last a forward and a backward into a side
  buffer (``torch.autograd.grad``), Horner-scaled; the last partition's forward and backward into
  ``.grad``; the side buffer added before it, as ``DracoStrategy._weighted_step`` does.

Reports the median step time of each and the peak bytes of tensors saved for backward (the
activations autograd keeps alive), plus the extra side buffer (one gradient's worth).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(256, 10),
    )


class SavedBytes:
    """Peak bytes of tensors saved for backward, counted through autograd's saved-tensor hooks."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return tensor, size

    def unpack(self, packed):
        tensor, size = packed
        self.live -= size
        return tensor


def weighted_loss(net, batches, weights, params):
    loss = sum(w * nn.functional.cross_entropy(net(x), y) for w, (x, y) in zip(weights, batches))
    loss.backward()


def exact_linear(net, batches, weights, params):
    side = None
    previous = weights[-1]
    for k, ((x, y), w) in enumerate(zip(batches, weights)):
        if side is not None:
            torch._foreach_mul_(side, previous / w)
        previous = w
        loss = nn.functional.cross_entropy(net(x), y)
        if k < len(batches) - 1:
            grads = torch.autograd.grad(loss, params)
            side = list(grads) if side is None else torch._foreach_add(side, grads)
        else:
            for p, s in zip(params, side):
                p.grad = s.clone()
            loss.backward()
    torch._foreach_mul_([p.grad for p in params], weights[-1])


def measure(step, net, batches, weights, repeats):
    params = [p for p in net.parameters()]
    times, peaks = [], []
    for _ in range(repeats + 1):
        for p in params:
            p.grad = None
        counter = SavedBytes()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            step(net, batches, weights, params)
        times.append(time.perf_counter() - start)
        peaks.append(counter.peak)
    grads = torch.cat([p.grad.flatten() for p in params])
    return statistics.median(times[1:]), max(peaks), grads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    net = model()
    batches = [(torch.randn(args.batch, 3, 32, 32), torch.randint(10, (args.batch,))) for _ in range(args.partitions)]
    weights = [0.8 + 0.3 * k for k in range(args.partitions)]
    before_s, before_b, g_before = measure(weighted_loss, net, batches, weights, args.repeats)
    after_s, after_b, g_after = measure(exact_linear, net, batches, weights, args.repeats)
    side = sum(p.numel() * p.element_size() for p in net.parameters())
    agree = float((g_after - g_before).norm() / g_before.norm())
    print(f"r={args.partitions}, batch {args.batch} per partition, {sum(p.numel() for p in net.parameters()):,} parameters,"
          f" {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| step | seconds | peak saved activations (MB) |")
    print("|---|---|---|")
    print(f"| weighted loss, one backward | {before_s:.4f} | {before_b / 2**20:.1f} |")
    print(f"| exact-linear, r backwards | {after_s:.4f} ({after_s / before_s:.2f}x) | {after_b / 2**20:.1f}"
          f" ({after_b / before_b:.2f}x) + side buffer {side / 2**20:.1f} |")
    print(f"gradients agree to {agree:.1e} (relative) in float32")


if __name__ == "__main__":
    main()
