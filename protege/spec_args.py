"""A job spec from the command line: load it, apply ``--set`` overrides, or exit 2 listing every
error by field. Shared by ``protege validate|run`` (cli.py) and ``protege submit`` (jobs_cli.py)."""

from __future__ import annotations

import sys

EXIT_INVALID = 2


def _print_spec_error(err) -> None:
    print(f"error: {err.source}: invalid job spec", file=sys.stderr)
    for loc, msg in err.errors:
        print(f"  {loc}: {msg}", file=sys.stderr)


def _load(path: str):
    from protege.core.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as err:
        _print_spec_error(err)
        raise SystemExit(EXIT_INVALID) from None


def _apply_overrides(spec, overrides: list[str]):
    """``--set rollout.temperature=0.7``: dotted path, YAML-parsed value, re-validated as a whole."""
    if not overrides:
        return spec
    import yaml

    from protege.core.spec import SpecError, parse_spec, set_dotted

    # Only what the user wrote: fields derived from others (eval.size from data.eval_size, ...) are
    # derived again from the overridden values instead of being frozen at their old ones.
    data = spec.model_dump(mode="json", exclude_unset=True)
    for item in overrides:
        if "=" not in item:
            print(f"error: --set expects key=value, got '{item}'", file=sys.stderr)
            raise SystemExit(EXIT_INVALID)
        key, value = item.split("=", 1)
        set_dotted(data, key, yaml.safe_load(value))
    try:
        return parse_spec(data, "--set")
    except SpecError as err:
        _print_spec_error(err)
        raise SystemExit(EXIT_INVALID) from None
