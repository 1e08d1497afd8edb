"""`make gpu-wheels`: the wheels camelid needs on the bare GPU image and that the image lacks,
downloaded here into `.whl/` (ignored by git) for the device tool to carry (`carry: [".whl"]`).

    python -m bench.gpu_wheels [--dest .whl] [--budget_mib 64] [--offline]

The GPU machine (nvidia-h200, see the device README and KINDS.md) runs Python 3.12 with torch
2.11 (CUDA 13), transformers 5.17, accelerate and peft, but no deepspeed, bitsandbytes,
datasets, fire, liger-kernel or flash-attn, and it reaches no package index. Everything that
travels (the working tree plus `.whl/`) must stay under 64 MiB.

What camelid imports on the kit's runs (bench/gpu_check.py records each run's imports; the
dry run checks them against IMAGE_PACKAGES + CARRY, see `imports_covered` there):
- datasets (fastchat_data.build and .preference: every recipe's tokenized training set) and its
  two needs the image lacks, dill and multiprocess. Essential: without it no recipe runs.
- liger-kernel (`--use_liger_kernel True` rows); pure Python + Triton (the image has Triton).
- bitsandbytes (QLoRA rows: nf4, double quantisation, paged AdamW). The wheel holds a CUDA
  library for every CUDA from 11.8 to 13.2 plus ROCm and XPU (43 MB); it is slimmed here to
  the CUDA 13 libraries the image's torch (cu130) loads, RECORD rewritten to match.
- deepspeed (the ZeRO-3 row): PyPI has an sdist only. It is built here into a pure-Python wheel
  with no ops compiled (DS_BUILD_OPS=0; DeepSpeed JIT-compiles an op on first use, and
  camelid's ZeRO runs use the torch AdamW, none of its ops); its needs the image lacks:
  hjson, pydantic, pydantic-core, annotated-types, typing-inspection, and typing-extensions
  (pydantic 2.14 needs >= 4.16; the image's version is not recorded, so it travels too).
Not carried (NOT_CARRIED says why): flash-attn (no wheel fits: the kit uses flex_attention and
sdpa and says so), fire (only the `camelid-data` command line imports it).

If the wheels and the tree do not fit the budget, whole groups are dropped, lowest priority
first (deepspeed, then bitsandbytes, then liger-kernel; datasets is essential), and the
manifest `.whl/MANIFEST.json` (which travels with the wheels) records what was dropped and
why: bench/gpu_check.py reads it and skips those rows with that reason.
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from bench import REPO
from fastchat_data.options import entry_point, option, parse

BUDGET_MIB = 64
MANIFEST = "MANIFEST.json"


@dataclass
class GPUWheelsOptions:
    dest: str = option(str(REPO / ".whl"), "the folder the wheels and MANIFEST.json go into")
    budget_mib: float = option(BUDGET_MIB, "what the wheels and the working tree may take, MiB")
    offline: bool = option(False, "only check and report what is in dest")


# the pip download recipe of the device README, for the image's Python 3.12 on x86-64
MANYLINUX = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
PLATFORM_ARGS += [x for p in MANYLINUX for x in ("--platform", p)]

# Python packages of the image 'cuda' (device KINDS.md, "Python packages already there", read on
# 2026-11-17), as distribution names normalised by `norm`.
IMAGE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
    werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)


@dataclass(frozen=True)
class Wheel:
    dist: str  # distribution name on PyPI
    version: str  # pinned: the version camelid's tests run with here
    why: str
    sdist_build: bool = False  # PyPI has no wheel: build one here from the sdist (pure Python)
    keep_libs: tuple[str, ...] = ()  # slim: keep only the native libraries with these names
    group: str = ""  # dropped together when over budget: set from CARRY_GROUPS' key


# Groups in priority order (when over budget, groups are dropped from the end), each a feature's
# wheel first, then what it needs.
CARRY_GROUPS = {
    "datasets": (
        Wheel(
            "datasets", "5.2.0", "fastchat_data.build / .preference: every recipe's training set"
        ),
        Wheel("dill", "0.4.1", "needed by datasets"),
        Wheel("multiprocess", "0.70.19", "needed by datasets"),
    ),
    "liger-kernel": (
        Wheel("liger-kernel", "0.8.5", "--use_liger_kernel True rows (Triton kernels)"),
    ),
    "bitsandbytes": (
        Wheel(
            "bitsandbytes",
            "0.50.2",
            "QLoRA rows: nf4, double quantisation, paged AdamW",
            keep_libs=(
                "libbitsandbytes_cpu.so",
                "libbitsandbytes_cuda130.so",
                "libbitsandbytes_cuda132.so",
            ),
        ),
    ),
    "deepspeed": (
        Wheel(
            "deepspeed",
            "0.19.8",
            "ZeRO-3 row (built here from the sdist, no ops compiled)",
            sdist_build=True,
        ),
        Wheel("hjson", "3.1.0", "needed by deepspeed"),
        Wheel("pydantic", "2.14.4", "needed by deepspeed"),
        Wheel("pydantic-core", "2.50.5", "needed by pydantic"),
        Wheel("annotated-types", "0.8.0", "needed by pydantic"),
        Wheel("typing-inspection", "0.4.5", "needed by pydantic"),
        Wheel(
            "typing-extensions",
            "4.16.0",
            "pydantic 2.14 needs >= 4.16 (image's version unknown)",
        ),
    ),
}
CARRY = tuple(replace(w, group=g) for g, wheels in CARRY_GROUPS.items() for w in wheels)
GROUP_ORDER = tuple(CARRY_GROUPS)

NOT_CARRIED = {
    "flash-attn": "no wheel fits: PyPI has no wheel of it (an sdist that compiles CUDA kernels for "
    "about an hour), and prebuilt release wheels are hundreds of MB, tied to one torch/CUDA build; "
    "the kit measures flex_attention and sdpa instead and skips flash_attention_2 rows",
    "fire": (
        "not imported by the recipes (only the `camelid-data` command line, fastchat_data/cli.py)"
    ),
}

# import name -> distribution, where they differ (for the import audit)
MODULE_DIST = {
    "yaml": "pyyaml",
    "bs4": "beautifulsoup4",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "google": "protobuf",
    "liger_kernel": "liger-kernel",
    "flash_attn": "flash-attn",
    "rouge_score": "rouge-score",
    "lm_eval": "lm-eval",
    "mlflow": "mlflow-skinny",
    "cpuinfo": "py-cpuinfo",
    "dateutil": "python-dateutil",
    "pydantic_core": "pydantic-core",
    "typing_extensions": "typing-extensions",
    "huggingface_hub": "huggingface-hub",
}
OWN_PACKAGES = {"recipes", "fastchat_data", "launch", "bench", "tests"}


def norm(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return name.lower().replace("_", "-").replace(".", "-")


def dist_of_module(module: str) -> str:
    top = module.split(".")[0]
    return norm(MODULE_DIST.get(top, top))


def on_image_or_carried(dist: str, carried: set[str] | None = None) -> bool:
    carried = {norm(w.dist) for w in CARRY} if carried is None else carried
    return norm(dist) in IMAGE_PACKAGES or norm(dist) in carried


def camelid_imports(root: Path = REPO) -> dict[str, list[str]]:
    """Third-party top-level modules that camelid's own code (recipes/, fastchat_data/, launch/)
    imports anywhere (module level or inside functions) -> where (file:line)."""
    found: dict[str, list[str]] = {}
    stdlib = set(sys.stdlib_module_names)
    for folder in ("recipes", "fastchat_data", "launch"):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in stdlib or top in OWN_PACKAGES or top == "__future__":
                        continue
                    found.setdefault(top, []).append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def requirements(wheel_path: Path) -> list[str]:
    """Requires-Dist of a wheel, without the `extra ==` ones."""
    with zipfile.ZipFile(wheel_path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [x.split(":", 1)[1].strip() for x in lines if x.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r]


def req_name(req: str) -> str:
    for i, c in enumerate(req):
        if not (c.isalnum() or c in "-_."):
            return norm(req[:i])
    return norm(req)


def tree_bytes(root: Path = REPO) -> int:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    total = 0
    for name in out.decode().split("\0"):
        p = root / name
        if name and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def slim_wheel(path: Path, keep_libs: tuple[str, ...]) -> tuple[int, list[str]]:
    """Rewrite the wheel without the native libraries not in `keep_libs` (RECORD to match).
    Returns (bytes before, names removed)."""
    before = path.stat().st_size
    removed = []
    tmp = path.with_suffix(".slim")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for info in src.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.endswith(".so") and base not in keep_libs:
                removed.append(info.filename)
                continue
            if info.filename != record_name:
                dst.writestr(info, src.read(info.filename))
        record = [
            line
            for line in src.read(record_name).decode().splitlines()
            if line and line.split(",", 1)[0] not in removed
        ]
        dst.writestr(record_name, "\n".join(record) + "\n")
    tmp.replace(path)
    return before, removed


def pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def wheel_file(dest: Path, w: Wheel) -> Path | None:
    stem = norm(w.dist).replace("-", "_")
    for p in dest.glob("*.whl"):
        name, version = p.name.split("-")[:2]
        if norm(name).replace("-", "_") == stem and version == w.version:
            return p
    return None


def fetch(dest: Path, w: Wheel) -> tuple[Path | None, str]:
    """The wheel in `dest` (downloaded or built unless already there); (None, why) if not."""
    have = wheel_file(dest, w)
    if have:
        return have, "already there"
    spec = f"{w.dist}=={w.version}"
    if not w.sdist_build:
        res = pip("download", "-q", "--no-deps", *PLATFORM_ARGS, "-d", str(dest), spec)
        if res.returncode:
            return None, f"pip download failed: {res.stderr.strip().splitlines()[-1:]}"
        return wheel_file(dest, w), "downloaded"
    with tempfile.TemporaryDirectory() as tmp:
        res = pip("download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, spec)
        if res.returncode:
            return None, f"sdist download failed: {res.stderr.strip().splitlines()[-1:]}"
        sdist = next(Path(tmp).glob("*.tar.gz"))
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        # no build isolation: setup.py imports torch, which this Python has (a CPU build does)
        wheel = ("wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-w", str(dest))
        res = pip(*wheel, str(sdist), env=env)
        if res.returncode:
            return None, f"building a wheel from the sdist failed: {res.stderr.strip()[-400:]}"
    built = wheel_file(dest, w)
    if built and not built.name.endswith("-py3-none-any.whl"):
        built.unlink()
        return None, "the sdist built a platform wheel (ops compiled?); not carried"
    return built, "built from the sdist"


def flash_attn_probe() -> str:
    """Whether the package index has a flash-attn wheel for the image, and its size."""
    with tempfile.TemporaryDirectory() as tmp:
        res = pip("download", "-q", "--no-deps", *PLATFORM_ARGS, "-d", tmp, "flash-attn")
        if res.returncode:
            last = (res.stderr.strip().splitlines() or ["?"])[-1]
            return f"checked: no wheel on the package index for cp312 manylinux ({last.strip()})"
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.whl"))
        return f"checked: a wheel of {size / 2**20:.0f} MiB"


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(GPUWheelsOptions, argv, prog="python -m bench.gpu_wheels", description=__doc__)
    dest = Path(opts.dest)
    dest.mkdir(parents=True, exist_ok=True)
    budget = int(opts.budget_mib * 2**20)

    rows, failed = [], {}
    for w in CARRY:
        if opts.offline:
            path, how = wheel_file(dest, w), "offline"
        else:
            path, how = fetch(dest, w)
        if path is None:
            failed[w.dist] = how if not opts.offline else "not in dest (--offline)"
            continue
        slim = None
        if w.keep_libs:
            with zipfile.ZipFile(path) as z:
                extra = [
                    n
                    for n in z.namelist()
                    if n.endswith(".so") and n.rsplit("/", 1)[-1] not in w.keep_libs
                ]
            if extra:
                before, removed = slim_wheel(path, w.keep_libs)
                slim = f"slimmed from {before / 2**20:.1f} MiB: kept {', '.join(w.keep_libs)}"
            else:
                slim = f"slim: only {', '.join(w.keep_libs)}"
        rows.append(
            {
                "dist": w.dist,
                "version": w.version,
                "file": path.name,
                "bytes": path.stat().st_size,
                "group": w.group,
                "why": w.why,
                "how": how,
                "slim": slim,
            }
        )

    # one version of each only: a stale file would stop the whole install there
    wanted = {r["file"] for r in rows}
    for p in dest.glob("*.whl"):
        if p.name not in wanted:
            print(f"removed stale {p.name}")
            p.unlink()

    # each carried wheel's own needs must be on the image or carried
    carried = {norm(r["dist"]) for r in rows}
    unmet = {}
    for r in rows:
        for req in requirements(dest / r["file"]):
            if not on_image_or_carried(req_name(req), carried):
                unmet.setdefault(r["dist"], []).append(req)
    dropped = {}
    for dist, reqs in unmet.items():
        dropped[dist] = f"needs {', '.join(reqs)}, neither on the image nor carried"
    for dist, why in failed.items():
        dropped[dist] = why
    groups_failed = {w.group for w in CARRY if w.dist in dropped}

    tree = tree_bytes()
    total = tree + sum(r["bytes"] for r in rows if r["group"] not in groups_failed)
    for group in reversed(GROUP_ORDER[1:]):  # datasets is essential: never dropped for size
        if total <= budget:
            break
        if group in groups_failed:
            continue
        size = sum(r["bytes"] for r in rows if r["group"] == group)
        groups_failed.add(group)
        total -= size
        for r in rows:
            if r["group"] == group:
                dropped[r["dist"]] = f"over the {opts.budget_mib:g} MiB budget (group {group})"
    keep = [r for r in rows if r["group"] not in groups_failed]
    for r in rows:
        if r not in keep:
            (dest / r["file"]).unlink(missing_ok=True)
            dropped.setdefault(r["dist"], f"dropped with its group {r['group']}")

    not_carried = dict(NOT_CARRIED)
    if not opts.offline:
        not_carried["flash-attn"] += f" ({flash_attn_probe()})"
    audit = camelid_imports()
    uncovered = {
        m: where
        for m, where in audit.items()
        if not on_image_or_carried(dist_of_module(m), {norm(r["dist"]) for r in keep})
    }

    manifest = {
        "made": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": "3.12 (the GPU image's)",
        "budget_bytes": budget,
        "tree_bytes": tree,
        "wheels_bytes": sum(r["bytes"] for r in keep),
        "total_bytes": total,
        "carried": keep,
        "dropped": dropped,
        "not_carried": not_carried,
        "camelid_imports_not_on_image": {m: w[:3] for m, w in uncovered.items()},
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    width = max([len(r["file"]) for r in keep] + [5])
    print(f"{'wheel':<{width}} {'MiB':>6}  why")
    for r in keep:
        note = f" [{r['slim']}]" if r["slim"] else ""
        print(f"{r['file']:<{width}} {r['bytes'] / 2**20:>6.2f}  {r['why']}{note}")
    print(
        f"\nwheels {manifest['wheels_bytes'] / 2**20:.2f} MiB + working tree "
        f"{tree / 2**20:.2f} MiB "
        f"= {total / 2**20:.2f} MiB of the {opts.budget_mib:g} MiB budget "
        f"({'fits' if total <= budget else 'OVER BUDGET'})"
    )
    for dist, why in {**dropped, **not_carried}.items():
        print(f"not carried: {dist}: {why}")
    if uncovered:
        print(
            "camelid imports these somewhere, and they are neither on the image nor carried "
            "(fine unless the kit's runs reach them; the dry run's imports_covered check says):"
        )
        for m, where in sorted(uncovered.items()):
            print(f"  {m} ({dist_of_module(m)}): {', '.join(where[:3])}")
    print(f"manifest: {dest / MANIFEST}")
    essential = [w.dist for w in CARRY if w.group == "datasets" and w.dist in dropped]
    return 1 if essential or total > budget else 0


if __name__ == "__main__":
    sys.exit(main())
