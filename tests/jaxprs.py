"""Walking a jaxpr for the tests that check what a program computes (dtypes of gradients, kernels called)."""

from collections.abc import Iterator

from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn


def equations(jaxpr: Jaxpr) -> Iterator[JaxprEqn]:
    """Every equation of `jaxpr` and of the jaxprs inside it (scan and remat bodies, pjit calls, custom
    VJPs, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, ClosedJaxpr):
                    yield from equations(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from equations(sub)
