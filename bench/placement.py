"""Where each rank's work lands: the devices a `gradientspace` command gives its base model, every Trainer, the routers,
the adapter bank, the encoder and the sketch, on every rank, read off the objects as the command makes them.

    torchrun --nproc_per_node 8 bench/placement.py --out placement/ run config.yaml                # a GPU node
    torchrun --nproc_per_node 2 bench/placement.py --fake-gpus 8 --out placement/ run config.yaml  # CPUs, 8 GPUs faked

Each rank writes `<out>/rank<R>.json` when the command ends. With `--fake-gpus N`, `torch.cuda` reports N GPUs and
every tensor that asks for one is made on the CPU instead (a `TorchFunctionMode` rewrites the device argument and
records the GPU asked for), and the process group is gloo where NCCL was asked: the command takes its GPU code paths,
and what each rank chose is what this file records. bf16 is reported unsupported, so a faked run computes in float32
as a CPU run does and its results can be compared with one. Without `--fake-gpus` the same records are taken from a
real run, and `cuda_asked` lists the GPUs its tensors were placed on.

What a rank records: `pick_device` (what `model.device: auto` gives it), `cuda_asked` (every GPU a tensor or module was
sent to), `set_device`, `backend` (the process group asked for), `base_model`, `encoder`, `routers`, `banks`,
`sketches` (each one's device), `trainings` (each Trainer run: its adapter, device, `n_gpu`, batch per step, optimizer
steps). tests/test_placement.py runs it with 8 faked GPUs; bench/gpu_check.py's `placement` part on every visible GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, from a plain checkout


class Placements:
    """What this rank chose, in the order it chose it."""

    def __init__(self, local_rank: int):
        self.data = {
            "local_rank": local_rank,
            "cuda_asked": set(),
            "set_device": [],
            "backend": None,
            "base_model": [],
            "encoder": [],
            "routers": [],
            "banks": [],
            "sketches": [],
            "trainings": [],
            "elsewhere": [],
        }

    def add(self, kind: str, value) -> None:
        self.data[kind].append(value)

    def asked(self, device: torch.device) -> None:
        self.data["cuda_asked"].add(str(device))
        if str(device) != self.data.get("pick_device", str(device)):
            # another rank's GPU: where it was asked for (the innermost frame of the package, then the library's), once
            frames = [f for f in traceback.extract_stack() if f.filename != __file__]
            package = [f for f in frames if "/gradientspace/" in f.filename]
            where = [f"{f.filename}:{f.lineno} {f.name}" for f in (package[-1:] + frames[-3:])]
            if {"device": str(device), "where": where} not in self.data["elsewhere"]:
                self.data["elsewhere"].append({"device": str(device), "where": where})

    def write(self, folder: Path, rank: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        data = {**self.data, "rank": rank, "cuda_asked": sorted(self.data["cuda_asked"])}
        (folder / f"rank{rank}.json").write_text(json.dumps(data, indent=1, default=str))


class GpuRequests(TorchFunctionMode):
    """Every device argument of every torch call, recorded when it names a GPU; with `fake`, made the CPU instead (and
    the calls a CPU tensor cannot answer, pinning and `.cuda()`, answered as a GPU would leave the data: in place)."""

    def __init__(self, placements: Placements, fake: bool):
        super().__init__()
        self.placements, self.fake = placements, fake

    def device(self, value):
        is_cuda_name = isinstance(value, str) and value.split(":")[0] == "cuda"
        if not (isinstance(value, torch.device) and value.type == "cuda") and not is_cuda_name:
            return value
        device = torch.device(value)
        if device.index is None:  # a bare `cuda` is the current device
            device = torch.device("cuda", torch.cuda.current_device())
        self.placements.asked(device)
        return torch.device("cpu") if self.fake else value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.device:  # naming a GPU places nothing
            return func(*args, **kwargs)
        if self.fake and func in (torch.Tensor.pin_memory, torch.Tensor.cuda):
            if func is torch.Tensor.cuda:
                self.device(args[1] if len(args) > 1 else kwargs.get("device", "cuda"))
            return args[0]
        args = tuple(self.device(a) for a in args)
        kwargs = {k: self.device(v) for k, v in kwargs.items()}
        if self.fake and kwargs.get("pin_memory"):  # safetensors stages a GPU load in pinned memory
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_gpus(count: int, placements: Placements):
    """`torch.cuda` reporting `count` GPUs (no bf16), a current device per process, and gloo where NCCL is asked."""
    current = [0]

    def set_device(device):
        index = device if isinstance(device, int) else torch.device(device).index
        placements.add("set_device", f"cuda:{index}")
        current[0] = index

    init_process_group = torch.distributed.init_process_group

    def gloo_instead(backend=None, *args, **kwargs):
        placements.data["backend"] = backend
        return init_process_group("gloo", *args, **kwargs)

    patches = {
        "is_available": lambda: True,
        "device_count": lambda: count,
        "set_device": set_device,
        "current_device": lambda: current[0],
        "is_bf16_supported": lambda *a, **k: False,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_allocated": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "get_device_name": lambda *a, **k: "faked GPU",
        # Trainer keeps the GPU's random state in every checkpoint: the CPU's stands in for it
        "get_rng_state": lambda *a, **k: torch.random.get_rng_state(),
        "get_rng_state_all": lambda: [torch.random.get_rng_state()],
        "set_rng_state": lambda *a, **k: None,
        "set_rng_state_all": lambda *a, **k: None,
    }
    with contextlib.ExitStack() as stack:
        for name, replacement in patches.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, replacement))
            if hasattr(torch.cuda.random, name):  # `torch.cuda.random.get_rng_state` is a name of its own
                stack.enter_context(mock.patch.object(torch.cuda.random, name, replacement))
        stack.enter_context(mock.patch.object(torch.distributed, "init_process_group", gloo_instead))
        # accelerate (Trainer's DDP) asks torch's device-generic API which accelerator there is
        accelerator = {
            "current_accelerator": lambda *a, **k: torch.device("cuda"),
            "is_available": lambda: True,
            "device_count": lambda: count,
            "current_device_index": lambda: current[0],
            "set_device_index": set_device,
            "synchronize": lambda *a, **k: None,
            # the optimizer's step asks whether a graph is being captured on the accelerator's stream
            "current_stream": lambda *a, **k: SimpleNamespace(is_capturing=lambda: False),
        }
        for name, replacement in accelerator.items():
            stack.enter_context(mock.patch.object(torch.accelerator, name, replacement, create=True))
        yield


def every_thread(placements: Placements, fake: bool) -> mock._patch:
    """A torch function mode holds for its own thread only: the serving engine decodes on a worker thread of its own."""
    run = threading.Thread.run

    def run_recorded(thread):
        with GpuRequests(placements, fake):
            run(thread)

    return mock.patch.object(threading.Thread, "run", run_recorded)


def spy(owner, name: str, record) -> mock._patch:
    """`owner.name` still does what it did; `record(result, *args, **kwargs)` sees each call first."""
    original = getattr(owner, name)

    def spied(*args, **kwargs):
        result = original(*args, **kwargs)
        record(result, *args, **kwargs)
        return result

    return mock.patch.object(owner, name, spied)


def device_of(module: torch.nn.Module) -> str:
    return str(next(module.parameters()).device)


@contextlib.contextmanager
def recorded(placements: Placements):
    """Spies on the objects that hold a device: what each was given, and where its weights are."""
    from transformers import Trainer

    from gradientspace.gradients.sketch import OnlineSVD
    from gradientspace.models import encoder, loading
    from gradientspace.models.bank import AdapterBank
    from gradientspace.routing import router as router_module
    from gradientspace.routing.router import Router

    def training(result, trainer, *args, **kwargs):
        placements.add(
            "trainings",
            {
                "adapter": trainer.args.run_name,
                "device": str(trainer.args.device),
                "n_gpu": trainer.args.n_gpu,
                "train_batch_size": trainer.args.train_batch_size,
                "steps": result.global_step,
                "model": device_of(trainer.model),
                "world_size": trainer.args.world_size,  # 2 or more: trained by the ranks together
                "wrapped": type(trainer.model_wrapped).__name__,
            },
        )

    spies = [
        spy(Trainer, "train", training),
        spy(
            loading,
            "load_base_model",
            lambda model, name, device, *a, **k: placements.add(
                "base_model", {"device": str(device), "weights": device_of(model)}
            ),
        ),
        *(  # loaded where embed_texts is given none, and as the routers' shared encoder
            spy(
                module,
                "load_encoder",
                lambda loaded, device: placements.add(
                    "encoder", {"device": str(device), "weights": device_of(loaded[1])}
                ),
            )
            for module in (encoder, router_module)
        ),
        spy(
            Router,
            "__init__",
            lambda _, router, *a, **k: placements.add(
                "routers", {"device": str(router.device), "head": device_of(router.head)}
            ),
        ),
        spy(
            AdapterBank,
            "__init__",
            lambda _, bank, *a, **k: placements.add(
                "banks", {"device": str(bank.device), "weights": device_of(bank.model)}
            ),
        ),
        spy(
            OnlineSVD, "__init__", lambda _, sketch, *a, **k: placements.add("sketches", {"device": str(sketch.device)})
        ),
    ]
    with contextlib.ExitStack() as stack:
        for patch in spies:
            stack.enter_context(patch)
        yield


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<R>.json")
    parser.add_argument("--fake-gpus", type=int, default=0, help="report this many GPUs and compute on the CPU")
    parser.add_argument(
        "--encoder", type=Path, help="an encoder folder instead of the packaged MiniLM (a machine without the package)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the gradientspace command and its arguments")
    args = parser.parse_args(argv)
    from gradientspace import distributed
    from gradientspace.cli import main as gradientspace
    from gradientspace.models.loading import pick_device

    rank, _ = distributed.world()
    placements = Placements(int(os.environ.get("LOCAL_RANK", 0)))
    with contextlib.ExitStack() as stack:
        if args.encoder:
            from gradientspace.models import encoder

            stack.enter_context(mock.patch.object(encoder, "minilm_path", lambda: args.encoder))
        stack.enter_context(recorded(placements))  # first: transformers' lazy imports look at torch.cuda
        if args.fake_gpus:
            stack.enter_context(fake_gpus(args.fake_gpus, placements))
        placements.data["pick_device"] = str(pick_device("auto"))
        stack.enter_context(GpuRequests(placements, fake=bool(args.fake_gpus)))
        stack.enter_context(every_thread(placements, fake=bool(args.fake_gpus)))
        code = gradientspace(args.command)
    placements.write(args.out, rank)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
