"""Superseded by ``glm-export bench`` (docs/bench.md); kept so the commands quoted in docs/runtime.md still run.

    python scripts/bench_runtime.py ARTIFACT [--checkpoint DIR] [--threads 2] [--prompt-tokens 128]
                                    [--new-tokens 128] [--rounds 2] [--attn eager] [--out DIR]

translates its old flags and runs ``glm-export bench`` (``--runs``, timed runs per process, is gone: every
round now runs one timed run per side after a warm-up; use ``--rounds`` for more samples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "runtime"), str(REPO)]


def translate(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", default=None)
    parser.add_argument("--prompt-tokens", default="128")
    parser.add_argument("--new-tokens", default="128")
    parser.add_argument("--rounds", default="3")
    parser.add_argument("--runs", default=None, help="ignored (see the module docstring)")
    parser.add_argument("--attn", default="eager")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)
    cmd = ["bench", args.artifact, "--prompt-len", args.prompt_tokens, "--new-tokens", args.new_tokens,
           "--repeats", args.rounds, "--attn", args.attn, "--out", args.out]
    cmd += ["--model", args.checkpoint] if args.checkpoint else []
    cmd += ["--threads", args.threads] if args.threads else []
    return cmd


if __name__ == "__main__":
    from glm_export.cli import app

    command = translate(sys.argv[1:])
    print("running: glm-export " + " ".join(command), file=sys.stderr)
    app(command)
