"""How long the ``ultramem`` command takes to answer before any work, against Python itself.

    python scripts/bench_startup.py [--rounds 15]

Each case is a fresh process: ``python -c pass`` (the floor any console script pays),
``ultramem --help``, ``ultramem export --help``, two bad inputs, and ``python -c "import
torch"`` (what every answer cost when the CLI imported its stages eagerly). The cases
are interleaved round by round, so a busy machine slows them alike; the table gives each
one's median and its ratio to ``python -c pass``. The script runs the ``ultramem`` next to
the interpreter it is started with (``.venv/bin/python`` → ``.venv/bin/ultramem``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cases(scratch: Path) -> dict[str, list[str]]:
    ultramem = str(Path(sys.executable).with_name("ultramem"))
    out = str(scratch / "out")
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "ultramem --help": [ultramem, "--help"],
        "ultramem export --help": [ultramem, "export", "--help"],
        "ultramem export --format bogus": [ultramem, "export", "--format", "bogus", "--out", out],
        "ultramem export builtin:nope": [ultramem, "export", "builtin:nope", "--out", out],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        commands = cases(Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, argv in commands.items():
                start = time.perf_counter()
                subprocess.run(argv, capture_output=True, check=False)
                times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["python -c pass"])
    print("| command | median ms | × `python -c pass` |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median * 1e3:.0f} | {median / floor:.1f}× |")


if __name__ == "__main__":
    main()
