import pytest

from gradientspace.config import ModelConfig
from gradientspace.data.records import Record
from gradientspace.models.loading import load_lora_model


def pytest_collection_modifyitems(items):
    """The longest files first, by the seconds their `heavy` marks say (a `slow` file without one counts ten): a long
    file picked up last would keep one worker busy while the others sit idle. pytest-xdist follows this order only with
    --no-loadscope-reorder, which `make test` passes."""

    def seconds(item) -> float:
        heavy = item.get_closest_marker("heavy")
        if heavy:
            return heavy.kwargs.get("seconds", 10)
        return 10 if item.get_closest_marker("slow") else 0

    cost: dict = {}
    for item in items:
        cost[item.path] = max(cost.get(item.path, 0), seconds(item))
    items.sort(key=lambda item: -cost[item.path])  # stable: files stay whole, equal ones in their order


def freeze_imports() -> None:
    """Every Trainer.train() begins with accelerate's `gc.collect()` (`free_memory`), which walks every object of the
    process: some 0.3 s for the half million torch, transformers and peft leave at import, paid again by each adapter a
    tiny run trains. Frozen, those objects (modules, classes, functions, alive until the process ends anyway) are left
    out of every later collection; garbage made afterwards is still collected."""
    import gc

    import peft  # noqa: F401  (imported here so that their objects are frozen with the rest)
    import transformers.trainer  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def imports_frozen():
    freeze_imports()  # once per worker, before its first test


@pytest.fixture(scope="session")
def tiny():
    """tiny-random with LoRA whose B is non-zero, so both A and B have non-trivial gradients."""
    import torch

    # float32 on any device: the tests hold gradients to 1e-5 (gpu_check runs them on CUDA, where `auto` is bf16)
    loaded = load_lora_model(ModelConfig(name="tiny-random", lora_rank=4, lora_alpha=8, dtype="float32"), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return loaded


def collated(examples, pad_id: int, model) -> tuple:
    """`collate`'s padded batch on the model's device (the CPU here; CUDA where gpu_check runs the tests)."""
    from gradientspace.data.tokens import collate

    return tuple(t.to(model.device) for t in collate(examples, pad_id))


def make_records(n: int, seed: int = 0) -> list[Record]:
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega tau rho".split()
    records = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 20)))
        response = " ".join(rng.choice(words) for _ in range(rng.randint(1, 15)))
        records.append(
            Record(id=f"r{i}", messages=[{"role": "user", "content": prompt}], response=response, source=f"s{i % 3}")
        )
    return records


def write_records(path, n: int) -> None:
    """`make_records(n)` as a JSON-lines training file."""
    import json

    rows = [
        {"id": r.id, "instruction": r.messages[0]["content"], "output": r.response, "source": r.source}
        for r in make_records(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def interrupted_after(stream, batches: int):
    """`stream` (a generator function) that raises KeyboardInterrupt after yielding `batches` items: a killed pass."""

    def interrupted(*args, **kwargs):
        for count, item in enumerate(stream(*args, **kwargs)):
            if count == batches:
                raise KeyboardInterrupt
            yield item

    return interrupted


def tiny_run_config(
    root,
    strategies: list[str],
    experts: str = "",
    evaluate: str = "limit: 4, generate_per_domain: 1, max_new_tokens: 4, latency_prompts: 1",
):
    """A `gradientspace run` config for tiny-random on a few mix4 records: every stage in seconds."""
    import json

    config = root / "tiny.yaml"
    config.write_text(f"""
out: {root / "run"}
model: {{name: tiny-random, lora_rank: 2}}
data: {{path: mix4-packaged, per_source: 5, max_length: 96}}
warmup: {{fraction: 0.25}}
sketch: {{rank: 4}}
cluster: {{method: gradientspace, k: 3, projection_dim: 16}}
experts: {{epochs: 2, strategies: {json.dumps(strategies)}{", " + experts if experts else ""}}}
router: {{epochs: 20}}
evaluate: {{data: "mix4-packaged:test", {evaluate}}}
""")
    return config


def shared_run(tmp_path_factory, name: str, config_of, record_warnings: bool = False):
    """A whole tiny run built once per test session and shared by every pytest-xdist worker (the first to ask builds it
    under a file lock in the session's folder). `config_of(root)` writes its config. With `record_warnings`, every
    warning and all stderr of the build are kept beside it (`build-warnings.json`) for tests about what users see."""
    import contextlib
    import io
    import json
    import os
    import warnings

    from filelock import FileLock

    from gradientspace.cli import main

    # a worker's base folder sits in the session's own folder (pytest-N/popen-gwK); without workers it is that folder
    session = (
        tmp_path_factory.getbasetemp().parent
        if os.environ.get("PYTEST_XDIST_WORKER")
        else tmp_path_factory.getbasetemp()
    )
    root = session / name
    built = root / "built"  # written last: a build that failed part way is never taken for a finished run
    with FileLock(str(session / f"{name}.lock")):
        if not built.exists():
            root.mkdir(exist_ok=True)
            stderr = io.StringIO()
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
                warnings.simplefilter("default")  # what a user's shell shows: each warning once per place
                code = main(["run", str(config_of(root))])
            assert code == 0, stderr.getvalue()[-2000:]
            if record_warnings:
                shown = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
                (root / "build-warnings.json").write_text(json.dumps({"warnings": shown, "stderr": stderr.getvalue()}))
            built.touch()
    return root / "run"


@pytest.fixture(scope="session")
def served_tiny_run(tmp_path_factory):
    """A whole tiny run of `routed` and `single` with every expert served (`keep: all`), shared by the session (see
    `shared_run`; its build's warnings are kept). Read it, or copy it before changing it (`copied_run`)."""
    config_of = lambda root: tiny_run_config(root, ["routed", "single"], experts="keep: all")
    return shared_run(tmp_path_factory, "served-tiny-run", config_of, record_warnings=True)


def decided_run_config(root, also: tuple[str, ...] = ()):
    """`routed` and `single` (and the strategies `also` names) with the keep rule deciding (the continued generalist,
    keep, blend, the threshold), and a sketch whose internal rank exceeds the sample count: exact, so a sharded gradient
    pass gives the same clusters."""
    config = tiny_run_config(root, ["routed", "single", *also])
    config.write_text(config.read_text().replace("sketch: {rank: 4}", "sketch: {rank: 4, internal_rank: 64}"))
    return config


@pytest.fixture(scope="session")
def decided_tiny_run(tmp_path_factory):
    """A whole run of `decided_run_config`, shared by the session: the reference a killed, a two-node or a changed run of
    the same config is compared with. Read it, or copy it before changing it."""
    return shared_run(tmp_path_factory, "decided-tiny-run", decided_run_config)


def copied_run(run, destination):
    """A copy of a finished run directory to change: `config_from_run(copy)` serves the copy (its `out` is the folder read)."""
    import shutil

    return shutil.copytree(run, destination / "run")


def opened_run(run_dir):
    """The run object of a finished run directory with the config it was made with, as `serve`, `route` and
    `backend-command` open it."""
    from gradientspace.config import config_from_run
    from gradientspace.runner import Run

    return Run(config_from_run(run_dir))


def accept_edits(run) -> None:
    """Record a run's outputs as they are now: a test that edits an adapter on purpose (outputs are verified before use)."""
    import json

    from gradientspace.runs import file_digest

    manifest = json.loads((run / "manifest.json").read_text())
    for entry in manifest["stages"].values():
        for output in entry.get("digests", {}):
            entry["digests"][output] = file_digest(run / output)
    (run / "manifest.json").write_text(json.dumps(manifest))
