"""A stand-in for `DocToLoRA` with its optimizer: what `save_checkpoint` and `load_checkpoint` use of a run,
its weights equal to the step they were saved at, so a checkpoint read back says which save it is."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


class TinyRun:
    def __init__(self) -> None:
        self.hypernet = torch.nn.Linear(3, 2)
        self.opt = torch.optim.AdamW(self.hypernet.parameters())
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0)

    def at_step(self, step: int) -> TinyRun:
        """One optimizer step, then every weight set to `step`."""
        self.hypernet(torch.ones(1, 3)).sum().backward()
        self.opt.step()
        with torch.no_grad():
            for p in self.hypernet.parameters():
                p.fill_(step)
        return self

    def save(self, directory: Path, dtype: torch.dtype) -> None:
        save_file({k: v.to(dtype).contiguous() for k, v in self.hypernet.state_dict().items()},
                  directory / "hypernet.safetensors")
        (directory / "config.json").write_text("{}")
