"""Step caches for the DiT experts, applied from outside the model: TeaCache, MagCache and
First Block Cache (teacache.py, magcache.py, fbcache.py) deciding per step and sample whether
to run the blocks or reuse their last residual (base.py: the DiT component wrapper).

    components = apply_step_cache(components, spec, "teacache", threshold=0.2)

Each expert gets its own policy (and coefficients, where the method has them); the denoise loop
sees components as before, plus the optional stage hooks that reset the state per stage and
report steps computed / reused into `out.timings`. Works on eager experts and on engines built
with `wan-rt build --step-cache` (the split step graphs).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from wan_rt.caching.base import Policy, StepCache
from wan_rt.caching.fbcache import FirstBlockCache
from wan_rt.caching.magcache import PUBLISHED_PARAMS, PUBLISHED_RATIOS, MagCache
from wan_rt.caching.teacache import IDENTITY, PUBLISHED, TeaCache, TeaCacheProbe, fit_coefficients
from wan_rt.config import ModelSpec

METHODS = ("teacache", "magcache", "fbcache")
__all__ = ["METHODS", "StepCache", "apply_step_cache", "calibrate_magcache", "fit_teacache", "make_policy",
           "remove_step_cache"]


def make_policy(spec: ModelSpec, component: str, method: str, threshold: Optional[float] = None,
                **options: Any) -> Policy:
    """The policy of one expert. options: teacache `coefficients` ({component: poly}) and `signal`;
    magcache `ratios` (a calibrated curve), `max_skips`, `retention`."""
    if method == "teacache":
        signal, default, published = PUBLISHED.get(spec.name, ("temb", 0.2, {}))
        coefficients = (options.get("coefficients") or {}).get(component) or published.get(component, IDENTITY)
        return TeaCache(default if threshold is None else threshold, coefficients, options.get("signal", signal))
    if method == "magcache":
        from wan_rt.caching.magcache import DEFAULT_THRESHOLD

        ratios = options.get("ratios") or PUBLISHED_RATIOS.get(spec.name)
        if ratios is None:
            raise ValueError(f"MagCache has no published ratios for {spec.name}: calibrate them first "
                             "(wan_rt.caching.calibrate_magcache) and pass ratios=")
        retention, never = PUBLISHED_PARAMS.get(spec.name, (0.2, ()))
        retention = 1.0 if component in never else options.get("retention", retention)
        return MagCache(DEFAULT_THRESHOLD if threshold is None else threshold, ratios,
                        options.get("max_skips", 2), retention)
    if method == "fbcache":
        return FirstBlockCache() if threshold is None else FirstBlockCache(threshold)
    raise ValueError(f"step cache must be one of {', '.join(METHODS)}; got {method!r}")


def apply_step_cache(components: Mapping[str, Any], spec: ModelSpec, method: str, threshold: Optional[float] = None,
                     **options: Any) -> dict[str, Any]:
    """`components` with every DiT expert wrapped in a StepCache (an existing one replaced)."""
    out = remove_step_cache(components)
    for name in spec.dit_components:
        out[name] = StepCache(out[name], make_policy(spec, name, method, threshold, **options))
    return out


def remove_step_cache(components: Mapping[str, Any]) -> dict[str, Any]:
    return {name: c.inner if isinstance(c, StepCache) else c for name, c in components.items()}


def calibrate_magcache(pipe: Any, **call: Any) -> list[float]:
    """MagCache's calibration: one generation with every step computed (pipe(**call)), the
    residual magnitude ratio recorded at every step; returns the curve `ratios=` takes."""
    probe = MagCache(threshold=0.0, ratios=None)
    _run_wrapped(pipe, {name: probe for name in pipe.spec.dit_components}, call)
    return probe.calibrated(pipe.num_timesteps)


def fit_teacache(pipe: Any, signal: str = "temb", degree: int = 4, **call: Any) -> dict[str, list[float]]:
    """TeaCache's calibration, per expert: one generation with every step computed; returns
    {component: polynomial} from the signal's relative L1 change to the residual's."""
    probes = {name: TeaCacheProbe(signal) for name in pipe.spec.dit_components}
    _run_wrapped(pipe, probes, call)
    return {name: fit_coefficients(*zip(*probe.pairs), degree=degree) for name, probe in probes.items()}


def _run_wrapped(pipe: Any, policies: Mapping[str, Policy], call: Mapping[str, Any]) -> None:
    before = dict(pipe.components)
    try:
        for name, policy in policies.items():
            pipe.components[name] = StepCache(remove_step_cache(before)[name], policy)
        pipe(**call)
    finally:
        pipe.components.clear()
        pipe.components.update(before)
