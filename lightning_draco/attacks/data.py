"""Attacks on the liar's data: it computes a genuine gradient, of the wrong batch."""

from __future__ import annotations

from typing import Any

import torch

from lightning_draco.attacks import Rule, at_least, register_data_attack


# None: the app fills in the data set's number of classes before the run.
@register_data_attack(
    "label_flip",
    num_classes=Rule(lambda v: v is None or at_least(2).holds(v), "an integer >= 2"),
    label_index=Rule(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
)
def label_flip(batch: Any, *, num_classes: int = 10, label_index: int = -1) -> Any:
    """Label flipping: every label y of the liar's batch becomes num_classes - 1 - y.

    ``batch``: a tuple or list whose ``label_index``-th entry (default the last) holds integer
    labels, or a dict with ``"label"`` or ``"y"``. The gradient the liar then sends is plausible
    in size and direction statistics: DRACO's replicas of the same partitions disagree with it and
    catch it; a robust rule sees one more gradient among many.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"attack 'label_flip': num_classes must be an integer >= 2 (got {num_classes!r}).")
    if isinstance(batch, dict):
        key = next((k for k in ("label", "y") if k in batch), None)
        if key is None:
            raise ValueError(f"attack 'label_flip': a dict batch needs a 'label' or 'y' entry (got keys {sorted(batch)}).")
        return {**batch, key: _flipped(batch[key], num_classes)}
    if not isinstance(batch, (tuple, list)) or not batch:
        raise ValueError(f"attack 'label_flip' needs a tuple, list or dict batch (got {type(batch).__name__}).")
    items = list(batch)
    items[label_index] = _flipped(items[label_index], num_classes)
    return type(batch)(items) if isinstance(batch, list) else tuple(items)


def _flipped(labels: Any, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"attack 'label_flip': labels must be an integer tensor (got {type(labels).__name__}).")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"attack 'label_flip': labels must lie in [0, num_classes={num_classes}) (got {int(labels.min())}..{int(labels.max())})."
        )
    return num_classes - 1 - labels
