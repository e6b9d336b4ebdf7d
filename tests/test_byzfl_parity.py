"""Where our definitions and ByzFL 0.0.11's agree, so do the outputs (on finite inputs without ties).

Runs only where ByzFL is installed (a development extra: ``pip install --no-deps byzfl==0.0.11``).
Krum and Multi-Krum (ByzFL scores n-f-1 neighbours, Blanchard et al. n-f-2) and the geometric
median (ByzFL: 3 Weiszfeld steps from zero) differ by definition and are not compared.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lightning_draco.aggregators import make_aggregator, make_pre_aggregator

if importlib.util.find_spec("byzfl") is None:
    pytest.skip("ByzFL is not installed (development extra 'peer')", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from decode import load_byzfl  # noqa: E402

B = load_byzfl()


@pytest.fixture
def x():
    return torch.randn(11, 40, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (("median", {}), lambda: B.Median()),
        (("trimmed_mean", {}), lambda: B.TrMean(f=2)),
        (("centered_clipping", {"tau": 1.0}), lambda: B.CenteredClipping(tau=1.0)),
        (("mda", {}), lambda: B.MDA(f=2)),
        (("monna", {"reference": 0}), lambda: B.MoNNA(f=2, idx=0)),
        (("meamed", {}), lambda: B.Meamed(f=2)),
    ],
)
def test_rules_agree_with_byzfl(x, ours, theirs):
    name, options = ours
    torch.testing.assert_close(make_aggregator(name, 2, **options)(x), theirs()(x.clone()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("nnm", lambda: B.NNM(f=2)),
        ("arc", lambda: B.ARC(f=2)),
        ({"name": "clipping", "threshold": 2.0}, lambda: B.Clipping(c=2.0)),
    ],
)
def test_pre_aggregators_agree_with_byzfl(x, ours, theirs):
    torch.testing.assert_close(make_pre_aggregator(ours, 2)(x), theirs()(x.clone()), rtol=1e-5, atol=1e-6)
