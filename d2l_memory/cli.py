"""The `d2l-memory` command line: training, evaluation and benchmarks (memory commands join them)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Long-term memory for LLM agents, stored in LoRA adapters.", no_args_is_help=True)

BENCHMARKS = {
    "internalize": "d2l_memory.benchmarks.internalize",
}


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="train.json of the run (created with defaults if missing)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override key=json_value, e.g. lr=0.001")] = None,
) -> None:
    """Meta-train a hypernetwork (resumes the run in the config's `out` directory)."""
    from d2l_memory.training.train import TrainConfig
    from d2l_memory.training.train import train as run

    raw = json.loads(config.read_text()) if config.exists() else {}
    for item in set_ or []:
        key, value = item.split("=", 1)
        raw[key] = json.loads(value)
    run(TrainConfig.model_validate(raw))


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(BENCHMARKS)}")],
    quick: Annotated[bool, typer.Option("--quick", help="the small size that CI runs")] = False,
) -> None:
    """Run a benchmark and print its table."""
    if name not in BENCHMARKS:
        raise typer.BadParameter(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    module = importlib.import_module(BENCHMARKS[name])
    sys.argv = [name, *(["--quick"] if quick else [])]
    module.main()


if __name__ == "__main__":
    app()
