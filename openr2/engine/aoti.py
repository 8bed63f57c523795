"""AOTInductor packages of the compiled steps (engine/compiled.py), kept on disk: export, build, verify, load.

A package is one step function compiled for one shape class: a number of new tokens per row, a block size,
and a range of rows. Context length, pool size and block-table width are dynamic. One row is exported with
one row fixed; several rows with the rows left to export, which reports the range its graph holds for (a
shape-dependent branch in the model, as the experts' "few (token, expert) pairs" path, bounds it), so a few
packages cover 2..16 rows: the first call outside every range exports the next.

On disk (cache_dir), per package: `<step>-<key hash>-rows<lo>.pt2` and its manifest `.json` (the key it was
built for, the rows it serves, the package's sha256), written whole and renamed into place, the manifest
last. A package is used only if its manifest's key equals this process's (torch version, CPU capability,
step, shapes, config, parameter names and shapes, openr2's model code) and the file's sha256 matches the
manifest: anything else (a truncated or edited file, a manifest for other code) is named in a warning, its
manifest removed, and the package built again. The hash in the name makes packages of other code, torch
versions or models invisible to this one. A package holds no weights: it reads the model's own tensors.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch


@dataclass
class Package:
    lo: int  # the rows it serves: lo..hi (hi may be math.inf)
    hi: float
    path: str | None  # None: export failed, torch.compile serves these shapes
    loader: object = False  # torch._C._aoti.AOTIModelPackageLoader: .boxed_run(list of tensors) -> list

    def covers(self, rows: int) -> bool:
        return self.lo <= rows <= self.hi


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def find(cache_dir: str, prefix: str, key: dict, rows: int, constants: dict) -> Package | None:
    """The verified package under `prefix` in cache_dir whose range covers `rows`, loaded; None if none."""
    for manifest_path in sorted(glob.glob(os.path.join(glob.escape(cache_dir), glob.escape(prefix) + "-rows*.json"))):
        path = manifest_path[: -len(".json")] + ".pt2"
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
            lo, hi = manifest["rows"]
            hi = math.inf if hi is None else hi
            if not lo <= rows <= hi:
                continue
            if manifest["key"] != key:
                changed = sorted(k for k in set(key) | set(manifest["key"]) if key.get(k) != manifest["key"].get(k))
                raise ValueError(f"built for another {', '.join(changed)}")
            if _sha256(path) != manifest["sha256"]:
                raise ValueError("its sha256 differs from the manifest's (a corrupt or partly written file)")
            return Package(lo, hi, path, _load(path, constants))
        except Exception as e:  # unreadable, stale or corrupt: never used; built again by the caller
            warnings.warn(f"{path}: cached compiled step not used ({type(e).__name__}: {str(e)[:200]}); "
                          "compiling it again", stacklevel=4)
            try:
                os.remove(manifest_path)
            except FileNotFoundError:
                pass
    return None


def build(cache_dir: str, prefix: str, key: dict, module: torch.nn.Module, example: tuple, pools: tuple,
          table_arg: int, width: int, constants: dict) -> Package:
    """Export `module` on `example` (one row if example has one, else several), compile it into a package,
    save it with its manifest, and load it.

    Arguments: the pools ([L, slots, ...]) at `pools`, the block table [rows, blocks] at `table_arg`, its
    write slots and write indices ([rows * width]) after it, every other argument [rows, ...]."""
    rows = example[0].shape[0]
    blocks, slots = torch.export.Dim("blocks", min=2), torch.export.Dim("slots")
    writes = (table_arg + 1, table_arg + 2)
    shapes = []
    for i in range(len(example)):
        if i in pools:
            shapes.append({1: slots})
            continue
        shape = {0: torch.export.Dim.AUTO} if rows > 1 else {}  # export finds the rows' range
        if i == table_arg:
            shape[1] = blocks  # PagedView pads tables to at least two columns: export specialises a size 1
        shapes.append(shape or None)
    with warnings.catch_warnings():  # torch's own export/packaging trips its LeafSpec deprecation
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.export.export(module, example, dynamic_shapes={"args": tuple(shapes)}, strict=False)
        _check_constants(program)
        lo, hi = (1, 1) if rows == 1 else _rows_range(program, pools, writes, width)
        if not lo <= rows <= hi:
            raise AssertionError(f"export's range of rows {lo}..{hi} misses its own example ({rows} rows)")
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        path = os.path.join(cache_dir, f"{prefix}-rows{lo}.pt2")
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # written whole, then renamed: atomic
            built = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(tmp, "step.pt2"),
                inductor_configs={"aot_inductor.package_constants_in_so": False})
            manifest = os.path.join(tmp, "manifest.json")
            with open(manifest, "w") as f:
                json.dump({"key": key, "rows": [lo, None if hi == math.inf else hi], "sha256": _sha256(built)}, f,
                          indent=1, sort_keys=True)
            for name in (built, manifest):
                os.chmod(name, 0o600)
            # loaded before it is made visible: a package this process cannot run is never left for the next
            loader = _load(built, constants)
            os.replace(built, path)
            os.replace(manifest, path[: -len(".pt2")] + ".json")  # the manifest last: it makes the package visible
    return Package(lo, hi, path, loader)


def _check_constants(program) -> None:
    """Refuse, before minutes of building, a step that reads a tensor that is neither a parameter nor a buffer
    (export lifts it as a constant: a plain tensor attribute, or one made in forward) unless inductor inlines it (a
    scalar or up to 8 values, GraphLowering.can_inline_constant): the package would read it as a constant of
    its own (_tensor_constant<i>) that its loader is never given."""
    lifted = {name: program.constants[name] for name in program.graph_signature.lifted_tensor_constants}
    stray = [f"{name} {tuple(t.shape)}" for name, t in lifted.items()
             if not (t.dim() == 0 or (t.dim() == 1 and t.shape[0] <= 8))]
    if stray:
        raise ValueError(f"the step reads tensor(s) that are not the model's parameters or buffers: {', '.join(stray)} "
                         "(make each a buffer)")


def _rows_range(program, pools: tuple, writes: tuple, width: int) -> tuple[int, float]:
    """The rows every row-sized input dimension of the exported program accepts (writes: rows * width)."""
    lo, hi = 1, math.inf
    placeholders = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
    for i, name in enumerate(program.graph_signature.user_inputs):
        if i in pools:
            continue
        size, per_row = placeholders[name].shape[0], width if i in writes else 1
        fixed = size if isinstance(size, int) else size.node.maybe_as_int()
        if fixed is not None:  # specialised (a range of one value): these rows only
            low = high = fixed
        else:
            bounds = program.range_constraints[size.node.expr]
            low, high = int(bounds.lower), float(bounds.upper)  # torch's int_oo: inf
        lo = max(lo, -(-low // per_row))
        hi = min(hi, high if high == math.inf else int(high) // per_row)
    return lo, hi


def _load(path: str, constants: dict):
    """The package's loader, reading `constants` (the model's own tensors) in place.

    The C++ loader directly: torch's aoti_load_package first probes which vector ISAs the machine has by
    compiling and running test programs (~2.5-5 s per process, only to warn on a mismatch; the key holds
    the CPU capability), then loads the package a second time."""
    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    names = loader.get_constant_fqns()
    missing = [name for name in names if name not in constants]
    if missing:  # a tensor the step captured that is no parameter or buffer (inductor names it _tensor_constant<i>)
        raise ValueError(f"the package reads {len(missing)} tensor constant(s) that are not the model's parameters or "
                       f"buffers: {', '.join(missing[:4])} (a plain tensor attribute or a tensor made in forward; "
                       "make it a buffer)")
    # (constants, use_inactive, check_full_update, user_managed)
    loader.load_constants({name: constants[name] for name in names}, False, True, True)
    return loader


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
