"""What a MODEL argument names, checked before anything is loaded or imported.

``ultramem`` refuses a MODEL it could never load (an unknown scheme, a bundled name that
is not bundled, a missing ``.pt2``, ``--weights`` where they do not apply) from this
module alone, which imports no torch: the answer comes in well under a second.
``loading.load_model`` runs the same checks first, so the two never disagree.
"""

from __future__ import annotations

from pathlib import Path

from ...files import path_name_problem
from ...models.catalog import DEFAULT_BUILTIN, list_builtins
from .errors import ModelLoadError

BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf:"
DEFAULT_MODEL = f"{BUILTIN_PREFIX}{DEFAULT_BUILTIN}"
FACTORY_ONLY = "--weights applies to package.module:factory models only"


def preflight_model(spec: str, weights: Path | None = None) -> str:
    """The kind of MODEL ``spec`` is (``builtin``, ``hf``, ``pt2``, ``factory``), or
    ``ModelLoadError`` saying why it can never load."""
    named = spec.removeprefix(HF_PREFIX) if spec.startswith(HF_PREFIX) else spec
    problem = (
        path_name_problem(named) if spec.startswith(HF_PREFIX) or spec.endswith(".pt2") else None
    )
    if problem is None and weights is not None:
        named, problem = str(weights), path_name_problem(weights)
    if problem is not None:
        raise ModelLoadError(f"{named}: {problem}")
    if spec.startswith(BUILTIN_PREFIX):
        if weights is not None:
            raise ModelLoadError(FACTORY_ONLY)
        known = list_builtins()
        # only a name from the listing: "../x" must not reach outside the folder
        if spec.removeprefix(BUILTIN_PREFIX) not in known:
            name = spec.removeprefix(BUILTIN_PREFIX)
            raise ModelLoadError(
                f"unknown builtin model {name!r}; known: {', '.join(known) or 'none'}"
            )
        return "builtin"
    if spec.startswith(HF_PREFIX):
        if weights is not None:
            raise ModelLoadError("--weights does not apply to hf:DIR (its weights are in DIR)")
        return "hf"
    if spec.endswith(".pt2"):
        if weights is not None:
            raise ModelLoadError(FACTORY_ONLY)
        if not Path(spec).is_file():
            raise ModelLoadError(f"no such .pt2 file: {spec}")
        return "pt2"
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ModelLoadError(f"MODEL {spec!r} must read package.module:factory")
        return "factory"
    raise ModelLoadError(
        f"unknown MODEL {spec!r}: use builtin:NAME, a .pt2 file, package.module:factory or hf:DIR"
    )
