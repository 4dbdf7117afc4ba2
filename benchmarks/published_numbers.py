"""The SeeSR and CoSeR papers' published quality numbers, each row with its source.

`published(model, set_name)` gives the rows for one model on one test set (an empty
list for a set nothing is published for). A row is one source's numbers: a paper's
table, or another paper's re-run of the same model. Keys are `jaxsr eval` metric
names; a metric a source does not report is absent, not zero.

Only numbers read in a source are written here; a source string says where, and
says so when the value was taken from a secondary summary and not checked against
the paper itself.
"""

from __future__ import annotations

import dataclasses

# Test-set names `benchmarks/reproduce_tables.py` knows; any other name is allowed
# and gets no published row.
KNOWN_SETS = ("div2k-val", "realsr", "drealsr", "reallr200", "imagenet-test2000")


@dataclasses.dataclass(frozen=True)
class Published:
    label: str                   # short column header, e.g. "OSEDiff re-run"
    source: str                  # where the numbers were read
    values: dict[str, float]     # jaxsr eval metric name -> published value

    def as_dict(self) -> dict:
        return {"label": self.label, "source": self.source, "values": dict(self.values)}


_OSEDIFF = ("Wu et al., One-Step Effective Diffusion Network for Real-World Image "
            "Super-Resolution (OSEDiff), arXiv 2406.08177: SeeSR re-run on DIV2K-Val in "
            "its comparison table")
_SEESR = ("Wu et al., SeeSR: Towards Semantics-Aware Real-World Image Super-Resolution, "
          "arXiv 2311.16518: the paper's own DIV2K-Val comparison")
_COSER = ("Sun et al., CoSeR: Bridging Image and Language for Cognitive Super-Resolution, "
          "arXiv 2311.16512v4, x4 results; taken from a secondary summary of the paper, "
          "not verified against the PDF")

PUBLISHED: dict[tuple[str, str], tuple[Published, ...]] = {
    ("seesr", "div2k-val"): (
        Published("OSEDiff re-run", _OSEDIFF,
                  {"lpips": 0.3194, "dists": 0.1968, "fid": 25.90, "musiq": 68.67,
                   "clipiqa": 0.6936}),
        Published("SeeSR paper", _SEESR, {"fid": 31.93}),
    ),
    ("coser", "imagenet-test2000"): (
        Published("CoSeR paper", f"{_COSER}; ImageNet Test2000",
                  {"lpips": 0.2863, "dists": 0.1482, "fid": 19.41, "musiq": 65.51}),
    ),
    ("coser", "realsr"): (
        Published("CoSeR paper", f"{_COSER}; RealSR",
                  {"lpips": 0.2438, "dists": 0.1826, "fid": 80.82, "musiq": 70.29}),
    ),
    ("coser", "drealsr"): (
        Published("CoSeR paper", f"{_COSER}; DRealSR",
                  {"lpips": 0.2702, "dists": 0.1977, "fid": 71.22, "musiq": 70.18}),
    ),
}


def published(model: str, set_name: str) -> list[Published]:
    """The published rows for `model` ("seesr" or "coser") on `set_name`."""
    return list(PUBLISHED.get((model, set_name), ()))
