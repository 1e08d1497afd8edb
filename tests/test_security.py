"""No pickle from a checkpoint reaches an unrestricted unpickler (recipes/core/safe_load.py).

Payloads of every kind are crafted by hand (each opcode that imports or calls, dotted names,
persistent ids, extension codes, paths out of the checkpoint, garbage) and planted in real
checkpoints of every strategy and of adapters, with the manifest rewritten to match, as an
attacker would. Each must be refused with a message and no side effect: the payload would
create a marker file, which must never appear. `test_payloads_are_live` shows the payloads
are real: loaded the way torch DCP and DeepSpeed load them without camelid's loaders, they
run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from train_utils import REPO, flags, run_in_repo, train

from recipes.core.checkpoint import describe_files, verify_checkpoint
from recipes.core.safe_load import (
    UnsafeCheckpoint,
    check_pickle_file,
    deepspeed_loads_weights_only,
    load_dcp_metadata,
)

FAST = [
    *flags(
        config="tiny_cpu.yaml",
        max_steps=2,
        save_steps=1,
        save_total_limit=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        model_max_length=256,
    ),
]
LORA = ["--quantization", "none", "--optim", "adamw_torch"]
COMPLETE = "COMPLETE"


# ---------------------------------------------------------------------------- the payloads


def _str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def command_of(marker: Path) -> bytes:
    return _str(f"touch {marker}")


def text_arg(marker: Path) -> bytes:
    data = f"touch {marker}".encode()
    return b"X" + len(data).to_bytes(4, "little") + data  # BINUNICODE


def payloads(marker: Path) -> dict[str, bytes]:
    """name -> a pickle that runs `touch marker` (or tries to) when loaded by a plain unpickler."""
    cmd = command_of(marker)
    text_cmd = f"touch {marker}"
    p4 = b"\x80\x04"
    found = {
        # GLOBAL + REDUCE, protocol 0 text
        "global_reduce": f"cos\nsystem\n(V{text_cmd}\ntR.".encode(),
        # STACK_GLOBAL (protocol 4) + TUPLE1 + REDUCE
        "stack_global": p4 + _str("os") + _str("system") + b"\x93" + cmd + b"\x85R.",
        # a dotted name inside an allowed module: pickle resolves it attribute by attribute
        "dotted_in_allowed_module": p4
        + _str("torch.distributed.checkpoint.metadata")
        + _str("os.system")
        + b"\x93"
        + cmd
        + b"\x85R.",
        "dotted_in_torch": p4 + _str("torch") + _str("os.system") + b"\x93" + cmd + b"\x85R.",
        "dotted_builtins": p4 + _str("builtins") + _str("eval.__self__") + b"\x93.",
        # INST: MARK args INST module name
        "inst": f"(V{text_cmd}\nios\nsystem\n.".encode(),
        # OBJ: MARK class args OBJ
        "obj": b"(cos\nsystem\n" + f"V{text_cmd}\n".encode() + b"o.",
        # NEWOBJ of a class that runs a command when constructed
        "newobj": p4
        + _str("subprocess")
        + _str("Popen")
        + b"\x93"
        + _str("true")
        + b"\x85"
        + b"\x85\x81.",
        "newobj_ex": p4
        + _str("subprocess")
        + _str("Popen")
        + b"\x93"
        + _str("true")
        + b"\x85"
        + b"\x85}\x92.",
        # BUILD with a __setstate__ reached through a global
        "build": p4 + _str("os") + _str("system") + b"\x93)\x81}b.",
        # extension codes (copyreg's registry): an unregistered one, refused as unreadable
        "ext1_unregistered": b"\x80\x02\x82\xf0" + cmd + b"\x85R.",
        # persistent ids (torch's storages use them; DCP metadata never does)
        "persid": b"Pos.system\n.",
        "binpersid": p4 + _str("os.system") + b"Q.",
        # garbage and truncation
        "truncated": pickle.dumps({"a": list(range(100))}, protocol=4)[:-7],
        "not_a_pickle": b"PK\x03\x04 this is no pickle at all",
        "empty": b"",
    }
    return found


def metadata_with_path(tmp: Path, relative_path: str) -> bytes:
    """Real DCP metadata whose storage entry points out of the checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    folder = tmp / f"dcp-{abs(hash(relative_path))}"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    meta = pickle.loads((folder / ".metadata").read_bytes())  # our own file, just written
    for info in meta.storage_data.values():
        info.relative_path = relative_path
    return pickle.dumps(meta)


def torch_file_with(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torch_payloads(marker: Path) -> dict[str, bytes]:
    """torch.save files (what DeepSpeed's *.pt and an adapter's optimizer.pt are) that run code
    under a plain torch.load(weights_only=False)."""
    evil = torch_file_with({"optimizer_state_dict": {"x": Payload(marker)}, "w": torch.ones(3)})
    with zipfile.ZipFile(io.BytesIO(evil)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))

    def rezip(data_pkl: bytes) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
            for name, data in members.items():
                z.writestr(name, data_pkl if name == pkl else data)
        return out.getvalue()

    # GLOBAL: the opcode torch's weights-only unpickler resolves names with
    dotted = b"\x80\x02cdeepspeed.runtime.zero.config\nos.system\n" + text_arg(marker) + b"\x85R."
    storage_type = b"\x80\x02(X\x07\x00\x00\x00storagecos\nsystem\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ."  # noqa: E501
    return {
        "torch_save_reduce": evil,
        "dotted_name_in_deepspeed_module": rezip(dotted),
        "persistent_id_storage_type": rezip(storage_type),
        "legacy_raw_pickle": pickle.dumps(Payload(marker), protocol=2),
    }


# ---------------------------------------------------------------------- the loaders alone


@pytest.mark.parametrize("kind", list(payloads(Path("/x"))))
def test_dcp_metadata_loader_refuses(kind, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "dcp" / ".metadata"
    path.parent.mkdir()
    path.write_bytes(payloads(marker)[kind])
    with pytest.raises(UnsafeCheckpoint) as e:
        load_dcp_metadata(path)
    assert "dcp/.metadata" in str(e.value)
    assert not marker.exists()


def test_extension_code_registered_to_os_system_is_refused(tmp_path):
    """copyreg's extension registry maps a code to (module, name): find_class still decides."""
    import copyreg

    marker = tmp_path / "PWNED"
    copyreg.add_extension("os", "system", 241)
    try:
        path = tmp_path / ".metadata"
        path.write_bytes(b"\x80\x02\x82\xf1" + command_of(marker) + b"\x85R.")
        with pytest.raises(UnsafeCheckpoint, match="refuses to unpickle os.system"):
            load_dcp_metadata(path)
    finally:
        copyreg.remove_extension("os", "system", 241)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["../../etc/passwd", "/etc/passwd", "sub/x.distcp", ".."])
def test_dcp_metadata_pointing_out_of_the_checkpoint_is_refused(where, tmp_path):
    path = tmp_path / ".metadata"
    path.write_bytes(metadata_with_path(tmp_path, where))
    with pytest.raises(UnsafeCheckpoint, match="points outside its folder"):
        load_dcp_metadata(path)


@pytest.mark.parametrize("kind", list(torch_payloads(Path("/x"))))
def test_torch_file_loaders_refuse(kind, tmp_path):
    """check_pickle_file (verification) and DeepSpeed's own checkpoint engine inside
    deepspeed_loads_weights_only (the load) both refuse, and nothing runs."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "PWNED"
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(torch_payloads(marker)[kind])
    with pytest.raises(UnsafeCheckpoint):
        check_pickle_file(path)
    with pytest.raises((UnsafeCheckpoint, RuntimeError)), deepspeed_loads_weights_only():
        TorchCheckpointEngine().load(str(path), map_location="cpu")
    with pytest.raises((UnsafeCheckpoint, RuntimeError)), deepspeed_loads_weights_only():
        torch.load(path, weights_only=False)  # what zero_to_fp32 calls
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is scoped


def test_a_torch_file_inside_a_torch_file_is_never_opened(tmp_path):
    """A nested archive: torch reads only archive/data.pkl; the inner file stays bytes."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "mp_rank_00_model_states.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02X\x05\x00\x00\x00inner.")
        z.writestr("archive/inner.pt", torch_payloads(marker)["torch_save_reduce"])
        z.writestr("archive/version", "3\n")
    check_pickle_file(path)
    with deepspeed_loads_weights_only():
        assert torch.load(path, weights_only=False) == "inner"
    assert not marker.exists()


def test_payloads_are_live(tmp_path):
    """The payloads above are real: loaded as torch DCP (pickle.load) and DeepSpeed
    (torch.load(weights_only=False)) load them, in a child process, they run."""
    markers = {k: tmp_path / f"m-{k}" for k in ("pickle", "torch")}
    (tmp_path / "meta").write_bytes(payloads(markers["pickle"])["stack_global"])
    (tmp_path / "states.pt").write_bytes(torch_payloads(markers["torch"])["torch_save_reduce"])
    code = (
        f"import pickle, torch; pickle.load(open({str(tmp_path / 'meta')!r}, 'rb')); "
        f"torch.load({str(tmp_path / 'states.pt')!r}, weights_only=False)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert markers["pickle"].exists() and markers["torch"].exists()


def test_real_checkpoint_files_pass(runs):
    """Every pickle-bearing file of a real checkpoint of each kind loads through the
    restricted loaders (the allowlist is complete for what torch and DeepSpeed write)."""
    checked = 0
    for out in runs.values():
        for ckpt in (out / "checkpoints").glob("step-*"):
            assert verify_checkpoint(ckpt) == [], ckpt
            checked += sum(1 for p in ckpt.rglob("*") if p.name.endswith((".metadata", ".pt")))
    assert checked >= 12


# ------------------------------------------------ planted in real checkpoints of each kind


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_dir) -> dict[str, Path]:
    """Two-step runs, a checkpoint per step: each pickle-bearing file kind camelid can meet."""
    root = tmp_path_factory.mktemp("security-runs")
    model = ["--model_name_or_path", str(llama_dir)]
    specs = {
        "single": ("single", 1, [], None),
        "fsdp": ("fsdp", 2, [], None),
        "zero3": ("zero3", 2, [], None),
        "lora": ("single", 1, LORA, REPO / "recipes" / "qlora.py"),
        "zero2_lora": ("zero2", 2, LORA, REPO / "recipes" / "qlora.py"),
    }
    out = {}
    for name, (strategy, nproc, extra, recipe) in specs.items():
        out[name] = root / name
        kwargs = {"recipe": recipe} if recipe else {}
        train(strategy, nproc, out[name], *FAST, *model, *extra, **kwargs)
    return out


def plant(ckpt: Path, name: str, payload: bytes) -> None:
    """Replace a file and rewrite the manifest to match: the attacker controls both."""
    (ckpt / name).write_bytes(payload)
    manifest = json.loads((ckpt / COMPLETE).read_text())
    manifest["files"].update(describe_files(ckpt, [name]))
    (ckpt / COMPLETE).write_text(json.dumps(manifest))


def pickle_files(ckpt: Path) -> list[str]:
    return sorted(
        str(p.relative_to(ckpt))
        for p in ckpt.rglob("*")
        if p.is_file() and (p.name == ".metadata" or p.suffix == ".pt")
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single", "fsdp", "zero3", "lora", "zero2_lora"])
def test_every_pickle_file_of_every_kind_is_refused_by_verification(kind, runs, tmp_path):
    marker = tmp_path / "PWNED"
    evil = {
        ".metadata": payloads(marker)["dotted_in_allowed_module"],
        ".pt": torch_payloads(marker)["dotted_name_in_deepspeed_module"],
    }
    source = runs[kind] / "checkpoints" / "step-00000002"
    names = pickle_files(source)
    assert names, f"{kind} wrote no pickle-bearing file?"
    for name in names:
        ckpt = tmp_path / f"ckpt-{name.replace('/', '_')}"
        shutil.copytree(source, ckpt)
        plant(ckpt, name, evil[".metadata" if name.endswith(".metadata") else ".pt"])
        problems = verify_checkpoint(ckpt)
        assert any("refuses" in p or "Unsupported global" in p for p in problems), (name, problems)
    assert not marker.exists()


def relaunch(strategy, nproc, out, llama_dir, *extra, recipe=None):
    kwargs = {"recipe": recipe} if recipe else {}
    return train(
        strategy,
        nproc,
        out,
        *FAST,
        "--model_name_or_path",
        str(llama_dir),
        *extra,
        "--max_steps",
        3,
        check=False,
        **kwargs,
    )


@pytest.mark.parametrize("kind", ["single", "lora"])
def test_resume_refuses_a_planted_checkpoint_and_uses_the_previous(kind, runs, llama_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(runs[kind], out)
    newest = out / "checkpoints" / "step-00000002"
    if kind == "single":
        plant(newest, "dcp/.metadata", payloads(marker)["stack_global"])
        res = relaunch("single", 1, out, llama_dir)
    else:
        plant(newest, "optimizer.pt", torch_payloads(marker)["torch_save_reduce"])
        res = relaunch("single", 1, out, llama_dir, *LORA, recipe=REPO / "recipes" / "qlora.py")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "failed verification" in res.stderr and "kept as damaged-step-00000002" in res.stderr
    assert "(step 1)" in res.stdout, res.stdout[-2000:]
    assert not marker.exists()


@pytest.mark.slow
def test_zero3_resume_refuses_planted_model_states(runs, llama_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(runs["zero3"], out)
    newest = out / "checkpoints" / "step-00000002"
    name = next(n for n in pickle_files(newest) if n.endswith("model_states.pt"))
    plant(newest, name, torch_payloads(marker)["torch_save_reduce"])
    res = relaunch("zero3", 2, out, llama_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kept as damaged-step-00000002" in res.stderr and "(step 1)" in res.stdout
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["single", "zero3"])
def test_convert_checkpoint_refuses_a_planted_checkpoint(kind, runs, tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "step-00000002"
    shutil.copytree(runs[kind] / "checkpoints" / "step-00000002", ckpt)
    name = next(n for n in pickle_files(ckpt) if n.endswith((".metadata", "model_states.pt")))
    data = (
        payloads(marker)["inst"]
        if name.endswith(".metadata")
        else torch_payloads(marker)["persistent_id_storage_type"]
    )
    plant(ckpt, name, data)
    res = run_in_repo(
        [
            sys.executable,
            "-m",
            "recipes.convert_checkpoint",
            str(ckpt),
            str(tmp_path / "converted"),
        ],
        timeout=300,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "failed verification" in res.stderr
    assert not marker.exists() and not (tmp_path / "converted").exists()


def test_loading_without_verification_still_refuses(runs, tmp_path):
    """Should verification ever be skipped (or the file change after it), the load itself is
    restricted: the DCP reader and DeepSpeed's engine refuse the same payloads."""
    from recipes.core.safe_load import dcp_load

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(runs["single"] / "checkpoints" / "step-00000002", ckpt)
    (ckpt / "dcp" / ".metadata").write_bytes(payloads(marker)["dotted_in_torch"])
    with pytest.raises(UnsafeCheckpoint, match="refuses to unpickle torch.os.system"):
        dcp_load({"model": {}}, ckpt / "dcp", no_dist=True)
    assert not marker.exists()


def test_struct_sanity():
    """The hand-built pickles above use the opcodes they claim (a guard on the test itself)."""
    import pickletools

    ops = {
        name: {op.name for op, _, _ in pickletools.genops(data)}
        for name, data in payloads(Path("/x")).items()
        if name not in ("truncated", "not_a_pickle", "empty")
    }
    assert "STACK_GLOBAL" in ops["stack_global"] and "REDUCE" in ops["stack_global"]
    assert "INST" in ops["inst"] and "OBJ" in ops["obj"] and "NEWOBJ" in ops["newobj"]
    assert "NEWOBJ_EX" in ops["newobj_ex"] and "BUILD" in ops["build"]
    assert "EXT1" in ops["ext1_unregistered"] and "PERSID" in ops["persid"]
    assert "BINPERSID" in ops["binpersid"] and "GLOBAL" in ops["global_reduce"]
