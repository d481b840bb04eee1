"""The frontier's samplers: name -> keyword arguments of NonAutoregressiveWrapper.generate.

`benchmarks.frontier` runs each named setting and records these arguments in every JSON row;
its module docstring says what each family of names means.
"""

from __future__ import annotations

from typing import Any

# the seed's generate() defaults, spelled out so that the JSON says what ran
SEED_DEFAULT: dict[str, Any] = {"start_temperature": 1.0, "filter_thres": 0.7}
# sampler name -> keyword arguments of NonAutoregressiveWrapper.generate. "seed-default" runs each
# library's own generate; every other entry is a demask sampler (demask's decoding loop), except
# "reference-cosine": the reference library's own generate loop on the model's net. Three keys
# are not generate's: "rule" (the reveal rule's settings: get_rule(sampler, **rule)), "schedule"
# (the wrapper's, the seed's 'cosine') and "loop" ("reference": the reference's wrapper runs).
ANCESTRAL: dict[str, Any] = {
    "sampler": "ancestral",
    "start_temperature": 1.0,
    "filter_thres": 0.0,
    "anneal_temperature": False,
}


def _proper(sampler: str, temperature: float = 1.0, **extra: Any) -> dict[str, Any]:
    """A sampler on the full distribution at a fixed temperature (no top-k, no annealing)."""
    return {**ANCESTRAL, "sampler": sampler, "start_temperature": temperature, **extra}


SAMPLERS: dict[str, dict[str, Any]] = {
    "seed-default": SEED_DEFAULT,
    "seed-cosine": {**SEED_DEFAULT, "schedule": "cosine"},
    "reference-cosine": {**SEED_DEFAULT, "schedule": "cosine", "loop": "reference"},
    "reference-linear": {**SEED_DEFAULT, "loop": "reference"},
    "ancestral": ANCESTRAL,
    **{
        name: {"sampler": name, **SEED_DEFAULT}
        for name in ("confidence", "low_confidence", "random", "margin", "entropy")
    },
    # demask's own samplers on the full distribution; the adaptive ones take `steps` as a cap
    "ancestral-t0.8": _proper("ancestral", 0.8),
    "remdm": _proper("remdm", rule={"eta": 0.02}),
    "threshold-0.9": _proper("threshold", rule={"tau": 0.9}),
    "threshold-0.7-t0.8": _proper("threshold", 0.8, rule={"tau": 0.7}),
    "factor-1": _proper("factor", rule={"factor": 1.0}),
    "entropy_bound-1": _proper("entropy_bound", rule={"gamma": 1.0}),
    "entropy_bound-1-t0.8": _proper("entropy_bound", 0.8, rule={"gamma": 1.0}),
    # semi-autoregressive blocks (block_size positions each), uncached and with Fast-dLLM's caches
    "block32-ancestral": _proper("ancestral", block_size=32),
    "block32-ancestral-t0.8-dual": _proper("ancestral", 0.8, block_size=32, cache="dual"),
    "block32-threshold-0.9-dual": _proper(
        "threshold", block_size=32, cache="dual", rule={"tau": 0.9}
    ),  # fmt: skip
    "block8-entropy_bound-1-t0.8-prefix": _proper(
        "entropy_bound", 0.8, block_size=8, cache="prefix", rule={"gamma": 1.0}
    ),
    # the seed's sampling (annealed temperature, top-k, cosine) with the threshold rule: every
    # candidate at probability >= tau is revealed, at least the schedule's count (steps: a cap)
    **{
        f"threshold-{tau}-seed-cosine": {
            **SEED_DEFAULT,
            "schedule": "cosine",
            "sampler": "threshold",
            "rule": {"tau": tau},
        }
        for tau in (0.7, 0.8, 0.9)
    },
    # the seed's sampling with another order of revealing (cosine schedule)
    **{
        f"{rule}-seed-cosine": {**SEED_DEFAULT, "schedule": "cosine", "sampler": rule}
        for rule in ("margin", "entropy", "low_confidence", "halton")
    },
    # the dilated order (DUS): the seed's sampling (annealed temperature, top-k), cosine schedule
    **{
        f"dilated-seed-cosine-t{t}-f{f}": {
            **SEED_DEFAULT,
            "start_temperature": t,
            "filter_thres": f,
            "schedule": "cosine",
            "sampler": "dilated",
        }
        for t in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.3, 1.4, 1.5)
        for f in (0.7, 0.5)
    },
    **{
        f"dilated-seed-linear-t{t}": {**SEED_DEFAULT, "start_temperature": t, "sampler": "dilated"}
        for t in (0.6, 0.8, 1.0)
    },
    # the 2-D Halton order (a 16 x 16 canvas for 256 bytes) at lower start temperatures
    **{
        f"halton-seed-cosine-t{t}": {
            **SEED_DEFAULT,
            "start_temperature": t,
            "schedule": "cosine",
            "sampler": "halton",
        }
        for t in (0.8, 0.9)
    },
    # the dilated order on the full distribution at a fixed temperature (no top-k, no annealing)
    **{
        f"dilated-proper-t{t}": {**_proper("dilated", t), "schedule": "cosine"}
        for t in (1.0, 0.9, 0.8)
    },
    # the seed's sampling (confidence, annealed temperature, top-k, cosine) in cached blocks
    **{
        f"block{k}-seed-cosine-dual": {
            **SEED_DEFAULT,
            "schedule": "cosine",
            "block_size": k,
            "cache": "dual",
        }
        for k in (32, 64)
    },
}
