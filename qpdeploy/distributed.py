"""Data-parallel scale training over processes, with accelerate.

``qpdeploy train --processes N`` (or ``accelerate launch -m qpdeploy.cli train ...``) starts N
processes of the same run. Each optimizer step's global batch is its ``grad_accum``
micro-batches of ``batch_size`` samples; process r computes micro-batches r, r + N, ...,
and the gradients of the trained scale sets are summed over processes (one all-reduce of
one flat buffer per step) before every process takes the same AdamW step. Every process
draws the same micro-batches (timesteps, noise) as a single-process run would, so the pack
equals the single-process pack with the same global batch up to the order of float
additions. Only process 0 writes (checkpoints, validation grids, the pack); every process
reads a checkpoint to resume.

On GPUs accelerate uses NCCL, one GPU per process; on CPUs, gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from .errors import QPDeployError


@dataclass
class ProcessGroup:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    accelerator: object

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place (every process gets the sum)."""
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def owns(self, micro: int) -> bool:
        """Whether this process computes micro-batch ``micro`` of a step."""
        return micro % self.world == self.rank

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


_GROUP: ProcessGroup | None = None


def free_port() -> int:
    """A TCP port free on loopback now (a server binds it a moment later)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group(cpu: bool = False) -> ProcessGroup | None:
    """The data-parallel group this process was launched in (None for a single process);
    ``cpu``: train on CPU processes (gloo) even where GPUs exist."""
    global _GROUP
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if _GROUP is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available())  # gloo over CPU processes
        _GROUP = ProcessGroup(accelerator.process_index, accelerator.num_processes, accelerator)
    return _GROUP


def check_parallel(processes: int, grad_accum: int, train_token: bool, subjects: bool) -> None:
    """What a data-parallel run needs; one line naming the problem."""
    if processes < 1:
        raise QPDeployError(f"--processes must be >= 1, got {processes}")
    if processes == 1:
        return
    if grad_accum < processes:
        raise QPDeployError(f"--processes {processes} splits each step's {grad_accum} micro-batch(es) over processes: "
                            f"give --grad-accum >= {processes} (the global batch is --batch-size x --grad-accum)")
    if train_token:
        raise QPDeployError("--train-token is not supported with --processes > 1 (the identifier row is not reduced)")
    if subjects:
        raise QPDeployError("--subjects trains in one process; drop --processes")


def launch(command: list[str], processes: int) -> int:
    """Run ``qpdeploy <command>`` in ``processes`` processes with ``accelerate launch``;
    returns its exit status."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", "qpdeploy.cli", *command]
    return subprocess.run(launcher).returncode
