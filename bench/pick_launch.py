"""Which Triton launch mode (ops/triton.py _LAUNCH) a GPU session's benchmark should run
with, from the window phases it measured just before.

    python bench/pick_launch.py PHASES.json [--margin 0.02]

Reads the medians `bench/window_phases.py --json` wrote for `fusedaccum[triton]` (the
process's launch mode: "auto", ops/triton.py's default, unless FUSEDACCUM_TRITON_LAUNCH
says otherwise) and its
variants `launch=<mode>` timed in the same rounds, and prints one word for
FUSEDACCUM_TRITON_LAUNCH: the mode of the shortest median window, if it beats the plain
contender by more than the margin (a fraction), else the plain contender's own mode. The
reason goes to stderr. No triton contender in the file: prints nothing, exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_PLAIN = "fusedaccum[triton]"
DEFAULT = "auto"  # ops/triton.py's _launch_from_env() without the variable (a test checks)


def pick(table: dict, plain_mode: str, margin: float) -> tuple[str, str]:
    """(mode, why) from window_phases' medians ``{contender: {phase: seconds}}``."""
    plain = table.get(_PLAIN, {}).get("window")
    if plain is None:
        raise KeyError(f"no {_PLAIN} window in the phases")
    best, best_t = plain_mode, plain
    for name, phases in table.items():
        prefix = f"{_PLAIN} launch="
        if name.startswith(prefix) and "window" in phases and phases["window"] < best_t:
            best, best_t = name[len(prefix):], phases["window"]
    if best != plain_mode and best_t < plain * (1 - margin):
        return best, (f"launch={best}: {best_t * 1e3:.2f} ms per window against "
                      f"{plain * 1e3:.2f} ms for {plain_mode} ({plain / best_t:.3f}x)")
    return plain_mode, (f"{plain_mode} kept: {plain * 1e3:.2f} ms per window; no launch mode "
                        f"beat it by more than {margin:.0%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phases", help="the JSON file window_phases.py --json wrote")
    ap.add_argument("--margin", type=float, default=0.02)
    args = ap.parse_args(argv)
    with open(args.phases) as f:
        table = json.load(f)
    plain_mode = os.environ.get("FUSEDACCUM_TRITON_LAUNCH", "").strip()
    if plain_mode not in ("jit", "direct", "cxx", "auto"):  # (ops/triton.py ignores it then)
        plain_mode = DEFAULT
    try:
        mode, why = pick(table, plain_mode, args.margin)
    except KeyError as exc:
        print(f"pick_launch: {exc.args[0]}", file=sys.stderr)
        return 1
    print(why, file=sys.stderr)
    print(mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
