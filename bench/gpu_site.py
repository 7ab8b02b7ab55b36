"""The installed packages the GPU machine lacks and cannot get as wheels of a size that travels, copied from this
environment into one folder that goes on that machine's PYTHONPATH (`make gpu-check` adds `.gpu-site`).

    .venv/bin/python bench/gpu_site.py .gpu-site --cuda 130

bitsandbytes' wheel holds a library per CUDA and ROCm version (125 MB installed): only the CPU one and the one for
the machine's CUDA (`--cuda`, 130 for CUDA 13.0) are kept, 5.5 MB. rouge-score (an sdist, with nltk, its stemmer) and
gguf are pure Python. Each package goes with its dist-info, so `importlib.metadata` versions read there as here.
"""

import argparse
import shutil
from importlib.metadata import distribution
from pathlib import Path

PACKAGES = ["bitsandbytes", "rouge-score", "nltk", "gguf"]


def copy_package(name: str, site: Path, cuda: str) -> None:
    dist = distribution(name)
    files = [Path(str(f)) for f in dist.files or []]
    root = Path(str(dist.locate_file("")))
    for relative in files:
        if "__pycache__" in relative.parts or relative.parts[0] == "..":
            continue
        if relative.suffix == ".so" and relative.name.startswith("libbitsandbytes_"):
            if relative.stem not in ("libbitsandbytes_cpu", f"libbitsandbytes_cuda{cuda}"):
                continue  # another CUDA or ROCm version's library
        target = site / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the folder to fill (emptied first)")
    parser.add_argument("--cuda", default="130", help="the GPU machine's CUDA version without the dot (13.0: 130)")
    args = parser.parse_args()
    shutil.rmtree(args.site, ignore_errors=True)
    for name in PACKAGES:
        copy_package(name, args.site, args.cuda)
    size = sum(f.stat().st_size for f in args.site.rglob("*") if f.is_file())
    print(f"{args.site}: {', '.join(PACKAGES)} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
