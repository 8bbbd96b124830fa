"""Plumbing shared by the numbered stages: NIfTI I/O, atomic writes, checkpoints, seeding,
device and mixed precision, torchrun/DDP, rank-0 printing, preview images, stage imports.

No model code lives here (STYLE.md): a stage that needs another stage's network imports it
with `load_stage("03_vqgan")`, so every class exists exactly once.

Conventions used by every stage
- NIfTI arrays are read in canonical RAS+ orientation: array axes (X, Y, Z) point to the
  patient's Right, Anterior and Superior, and `affine @ [i, j, k, 1]` is the world position
  (mm) of voxel (i, j, k).
- Networks see the same data as tensors (C, D, H, W) = (1, Z, Y, X): `xyz_to_dhw` and
  `dhw_to_xyz` convert (a transpose, no flips), so a (256, 256, 32) NIfTI is a
  (1, 32, 256, 256) tensor, as in the paper (docs/reference.md §1).
"""
import argparse
import contextlib
import csv
import errno
import hashlib
import importlib.util
import json
import os
import random
import re
import resource
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    A crash (or an exception inside the block) leaves `path` as it was and removes the
    temporary file, so a half-written output never looks finished. The temporary name
    keeps the extension (`.nii.gz`, `.png`, ...) because writers pick the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


TEMP_MARK = ".tmp"  # temporary names: .<name>.<pid>.tmp<ext>


def remove_stale_temps(folder):
    """Delete the temporary files that a killed run left in `folder` (recursively): those whose
    writer process is gone. A live writer's (another torchrun rank's) are left alone."""
    removed = []
    for f in Path(folder).rglob(f".*{TEMP_MARK}*"):
        m = re.fullmatch(r"\..+\.(\d+)\.tmp(\..+)?", f.name)  # atomic_path's names only
        if m and f.is_file() and not _alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_out(out, inputs=(), flag="--out"):
    """Make an output folder ready, or exit with one line saying why not.

    Refuses an `out` that is, lies inside, or contains one of the `inputs` (files or folders the
    stage only reads), so no output can ever land on a user's data; creates it; checks that it
    can be written; removes temporary files left by a killed run (they would otherwise be read
    as results). Returns the paths removed."""
    out = Path(out)
    res = out.resolve()
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        src = Path(src).resolve()
        if res == src or src in res.parents or res in src.parents:
            raise SystemExit(f"error: {flag} {out} overlaps the input {src} (the same folder, inside it, or "
                             f"holding it); outputs never go where inputs live: choose another {flag}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}{TEMP_MARK}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: {flag} {out}: cannot write here ({e.strerror})") from None
    removed = remove_stale_temps(out)
    if removed:
        print0(f"removed {len(removed)} temporary file(s) left in {out} by an interrupted run")
    return removed


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the stages' defaults, and a bad argument reported on one line (exit code 2):
    `03_vqgan.py: error: argument --steps: must be >= 1, got -5 (see --help)`."""

    def __init__(self, description, **kwargs):
        super().__init__(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(lo, kind=int):
    """argparse type: a number >= lo, e.g. `type=at_least(1)` for a count, `at_least(0.0, float)`."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not v >= lo:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return v
    return parse


def positive(text):
    """argparse type: a float > 0 (a learning rate, a size in mm)."""
    v = at_least(0.0, float)(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def named_dir(text):
    """argparse type: NAME=DIR (a synthetic set for 06 and 07) -> (NAME, Path(DIR)). NAME names files
    and table rows: letters, digits, _, . and -, not starting with a dot."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"must be NAME=DIR, got {text!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
        raise argparse.ArgumentTypeError(f"NAME names files: letters, digits, _, . or -, got {name!r}")
    return name, Path(folder)


def in_range(lo, hi, kind=float):
    """argparse type: a number in [lo, hi], e.g. a probability `in_range(0, 1)`."""
    def parse(text):
        v = at_least(lo, kind)(text)
        if v > hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {text}")
        return v
    return parse


def check_order(parser, args, flag, strict=True):
    """Exit with a one-line error unless the two values of `flag` (e.g. --hu MIN MAX) are in order."""
    lo, hi = getattr(args, flag.lstrip("-").replace("-", "_"))
    if lo > hi or (strict and lo == hi):
        relation = "below" if strict else "at most"
        parser.error(f"argument {flag}: the first value must be {relation} the second, got {lo:g} {hi:g}")


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)  # the output, not one case


def run_stage(main, get_args):
    """`if __name__ == "__main__": run_stage(main, get_args)`: a full disk, a read-only folder or
    a missing permission ends the run with one line naming the file, not a traceback."""
    args = get_args()
    try:
        return main(args)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        where = e.filename or "writing an output"
        raise SystemExit(f"error: {where}: {e.strerror}; nothing half-written was kept (outputs are written "
                         f"atomically), rerun once fixed to resume") from None


def save_json(obj, path):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")


def guard_settings(path, settings, overwrite=False):
    """Record the settings that made an output folder; refuse to mix runs with other settings.

    If `path` exists and differs from `settings` (compared as JSON), exit with a message
    naming the changed keys unless `overwrite`. Then (re)write `path`.
    """
    path = Path(path)
    settings = json.loads(json.dumps(settings, default=_json_default))  # the form it has on disk
    if path.exists() and not overwrite:
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise SystemExit(f"error: {path.parent} was made with other settings ({', '.join(changed)}); "
                             f"pass --overwrite to redo it, or choose another output folder")
    save_json(settings, path)
    return settings


def read_split(prep, masks=False):
    """`prep/split.json` (01) with each listed volume checked: a missing image (or, with
    masks=True, a missing 02 mask) costs that volume, reported in one line, not the run."""
    prep = Path(prep)
    path = prep / "split.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: run 01_preprocess.py (--out {prep}) first")
    try:
        split = json.loads(path.read_text())
        assert isinstance(split.get("train"), list) and isinstance(split.get("test"), list)
    except (ValueError, AssertionError):
        raise SystemExit(f"error: {path}: not a split written by 01_preprocess.py") from None
    if masks:
        check_masks_current(prep)
    for part in ("train", "test"):
        kept, lost = [], []
        for n in split[part]:
            has_mask = (prep / "masks" / f"{n}.nii.gz").is_file()
            ok = (prep / "images" / f"{n}.nii.gz").is_file() and (has_mask or not masks)
            (kept if ok else lost).append(n)
        if lost:
            what = "image or 02 mask" if masks else "image"
            print0(f"warning: {len(lost)} {part} volume(s) of {path} have no {what} and are left out: "
                   f"{', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}")
        split[part] = kept
    return split


def training_data_record(prep, names):
    """What a training run (03, 04) records of its data, so a resume on other data is refused: the
    --prep folder, the training volumes, and the sha1 of 01's and 02's settings."""
    prep = Path(prep)
    record = {"prep": str(prep.resolve()), "train": list(names)}
    for k in ("config.json", "masks/config.json"):
        if (prep / k).is_file():
            record[k] = file_fingerprint(prep / k)
    return record


def check_masks_current(prep):
    """Exit with one line if prep/masks (02) was made from another run of 01 than prep holds now
    (02 records the sha1 of 01's config.json): 03-06 would pair new volumes with old masks."""
    prep = Path(prep)
    made, now = prep / "masks" / "config.json", prep / "config.json"
    if made.is_file() and now.is_file():
        source = json.loads(made.read_text()).get("prep")
        if source is not None and source != file_fingerprint(now):
            raise SystemExit(f"error: {prep / 'masks'} was made from another preprocessing than {prep} "
                             f"holds now (01 ran again since): rerun 02_masks.py --overwrite")


def inputs_fingerprint(files, root=None):
    """What an output records of its inputs without reading them: name, size and mtime of each
    file. A changed or replaced input gives another fingerprint; so does a moved one, unless the
    names are taken relative to `root` (a folder that may move as a whole)."""
    out = {}
    for f in map(Path, files):
        st = f.stat()
        name = f.relative_to(root).as_posix() if root is not None else str(f.resolve())
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def file_fingerprint(path, chunk=1 << 22):
    """sha1 of a file's bytes (16 hex digits): what an output folder records of the checkpoint it
    was made from, so that a retrained checkpoint at the same path is noticed."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def _json_default(x):
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, (np.ndarray, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# --------------------------------------------------------------------------- NIfTI
NIFTI_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError)
MAX_NIFTI_GB = 2.0  # the largest voxel data read (a 512x512x2000 int16 CT is 1 GiB)


def read_nifti(path, dtype=np.float32, max_gb=MAX_NIFTI_GB):
    """Read a NIfTI file reoriented to canonical RAS+. Returns (array (X, Y, Z, ...), affine).

    Any failure to read (missing, truncated, not NIfTI, or a header that promises more than
    `max_gb` GiB of voxels: checked before any voxel is read, so a crafted 1 MB gzip cannot
    inflate to gigabytes) is raised as ValueError naming the file. Intensity scaling
    (scl_slope/scl_inter) is applied; `dtype=None` keeps the stored type when there is no
    scaling (labels).
    """
    try:
        img = nib.load(str(path))
        _check_nifti_size(path, img, max_gb)
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj) if dtype is None else img.get_fdata(dtype=dtype)
    except NIFTI_READ_ERRORS as e:
        raise ValueError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
    return data, img.affine.copy()


def _check_nifti_size(path, img, max_gb):
    n = int(np.prod(img.header.get_data_shape(), dtype=np.int64)) * img.header.get_data_dtype().itemsize
    if n > max_gb * 2**30:
        shape = img.header.get_data_shape()
        raise ValueError(f"its header promises {n / 2**30:.1f} GiB of voxels {shape}, over the "
                         f"{max_gb:g} GiB limit")
    if str(path).endswith(".nii"):  # uncompressed: the file must hold what the header promises
        need = int(img.header["vox_offset"]) + n
        if os.path.getsize(path) < need:
            have = os.path.getsize(path)
            raise ValueError(f"truncated: the header promises {need} bytes, the file has {have}")


def write_nifti(path, data, affine, dtype):
    """Write `data` (X, Y, Z) with `affine` atomically; qform and sform both set (scanner, mm)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def spacing_of(affine):
    """Voxel size (mm) along each array axis: the column norms of the affine."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))


def case_id(path):
    """`Case_00001_0000.nii.gz` -> `Case_00001` (nnU-Net channel suffix dropped), `x.nii` -> `x`."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    stem, _, tail = name.rpartition("_")
    return stem if stem and len(tail) == 4 and tail.isdigit() else name


def xyz_to_dhw(a):
    """NIfTI array (X, Y, Z) -> network layout (D, H, W) = (Z, Y, X)."""
    return np.ascontiguousarray(np.asarray(a).transpose(2, 1, 0))


def dhw_to_xyz(a):
    """Network layout (D, H, W) -> NIfTI array (X, Y, Z)."""
    return np.ascontiguousarray(np.asarray(a).transpose(2, 1, 0))


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by `save_checkpoint`. Tensors, numbers, strings, lists and
    dicts only (`weights_only=True`): a checkpoint is a pickle, and we never execute one."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {path}: no checkpoint here (run the stage that writes it first)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's own message would suggest unpickling it anyway: never do that
        raise SystemExit(f"error: {path}: cannot load this checkpoint ({type(e).__name__}): it is truncated, "
                         f"corrupt, or holds objects other than tensors and numbers, which are never "
                         f"unpickled here; rerun the stage that writes it") from None


def checkpoint_parts(ck, path, keys, writer):
    """Exit with one line unless the loaded checkpoint `ck` has every key (a 03 checkpoint passed
    where 04's is expected, say), and every tensor in it is finite (a diverged run)."""
    missing = [k for k in keys if k not in ck]
    if missing:
        raise SystemExit(f"error: {path}: not a checkpoint of {writer} (it has no {', '.join(missing)})")
    for k in keys:
        if isinstance(ck[k], dict):
            floats = {n: t for n, t in ck[k].items() if torch.is_tensor(t) and t.is_floating_point()}
            bad = [n for n, t in floats.items() if not t.isfinite().all()]
            if bad:
                raise SystemExit(f"error: {path}: {len(bad)} weight tensor(s) hold NaN or inf ({bad[0]}, "
                                 f"...): the training diverged; this checkpoint cannot be used")
    return ck


def args_record(args):
    """A run's arguments as a checkpoint stores them: a dict, paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def check_resume(saved, current, keys, path):
    """Refuse to resume a run whose settings differ: `saved` are the args a checkpoint records,
    `current` this run's (both dicts); only `keys` must match (--steps may grow, logging change)."""
    changed = [k for k in keys if k in saved and json.dumps(saved[k], default=_json_default)
               != json.dumps(current[k], default=_json_default)]
    if changed:
        label = {"data": "the training data (--prep, and what 01 and 02 wrote there)",
                 "vqgan_sha1": "the --vqgan checkpoint"}
        what = ", ".join(label.get(k, f"--{k.replace('_', '-')} {saved[k]} -> {current[k]}") for k in changed)
        raise SystemExit(f"error: {path} was trained with other settings ({what}); resume with the same "
                         f"ones, or start again with --fresh (or another --out)")


def open_resume(path, fresh, keys, writer, args, same, device):
    """The checkpoint a training run resumes from, or None (none yet, or --fresh). It must hold
    `keys` (else it is not `writer`'s) and share this run's settings named in `same`."""
    if fresh or not path.exists():
        return None
    ck = checkpoint_parts(load_checkpoint(path, map_location=device), path, keys, writer)
    check_resume(ck["args"], args_record(args), same, path)
    return ck


def training_state(step, args, model_kwargs, parts, gen, device, **extra):
    """A resumable checkpoint: the step, the arguments, the model's constructor arguments, the
    state of each of `parts` (networks, optimisers, grad scaler) and of every RNG the loop draws
    from (the global ones and `gen`), so a resumed run draws what the uninterrupted one would."""
    rng = {"torch": torch.get_rng_state(), "gen": gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    parts = {name: part.state_dict() for name, part in parts.items()}
    return {"step": step, "args": args_record(args), "model_kwargs": model_kwargs, **extra, **parts,
            "rng": rng}


def resume(ck, path, parts, gen, device, model_kwargs):
    """Restore what `training_state` saved into `parts` and the RNGs; -> the step to go on from."""
    if ck["model_kwargs"] != model_kwargs:
        raise SystemExit(f"error: {path} holds a model with {ck['model_kwargs']}; this run asks for "
                         f"{model_kwargs}. Use another --out, or --fresh to start again")
    for name, part in parts.items():
        part.load_state_dict(ck[name])
    torch.set_rng_state(ck["rng"]["torch"])
    if device.type == "cuda" and "cuda" in ck["rng"]:
        torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
    # 03's checkpoints called the batch generator "batch" before 2026-11-29: they resume too
    gen.set_state(ck["rng"]["gen" if "gen" in ck["rng"] else "batch"])
    print0(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


# --------------------------------------------------------------------------- seeding, device, precision
def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    """`auto` -> the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class Precision:
    """How a training step runs: autocast dtype (None = fp32) and a GradScaler (fp16 only).

    Use as `with prec.autocast(): loss = ...` then `prec.scaler.scale(loss).backward()`;
    with bf16 or fp32 the scaler is disabled and passes everything through unchanged.
    """
    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @property
    def name(self):
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def choose_precision(device, want="auto"):
    """`auto`: bf16 on CUDA where supported (Ampere and newer), fp16 + GradScaler on older
    CUDA GPUs, fp32 on the CPU. `bf16`, `fp16`, `fp32` force a choice; on the CPU mixed precision
    is slower than fp32, but runs the GPU's code path (the tests use it so)."""
    device = torch.device(device)
    if want == "auto":
        if device.type != "cuda":
            want = "fp32"
        else:
            want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[want]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return Precision(device.type, dtype, scaler)


# --------------------------------------------------------------------------- torchrun / DDP
@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """Start DDP when launched by torchrun (RANK/WORLD_SIZE set), else a single process.

    NCCL on CUDA (one GPU per process, chosen by LOCAL_RANK), gloo on the CPU.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, 0, pick_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def start_run(device="auto", precision="auto", seed=0):
    """The first lines of every training/sampling script: torchrun/DDP set-up, a seed per rank,
    the precision, cuDNN autotuning on CUDA. Returns (Dist, Precision)."""
    d = setup_distributed(device)
    seed_everything(seed + d.rank)
    prec = choose_precision(d.device, precision)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return d, prec


def csv_logger(path, fields, start_step=0, enabled=True):
    """A training log: `path` gets a header when the run starts at step 0 (or the file is missing);
    a run resumed at `start_step` keeps the rows up to that step and drops later ones (written
    after the checkpoint it resumed from), so no step is logged twice. Returns write(row); floats
    are written with 6 significant digits. enabled=False (ranks > 0) writes nothing."""
    path = Path(path)
    if enabled:
        rows = []
        if start_step > 0 and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and float(r[0]) <= start_step]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([fields, *rows])

    def write(row):
        if enabled:
            with open(path, "a", newline="") as f:
                csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return write


def ddp_check(models, world):
    """After DDP training: print the largest weight difference between rank 0 and any other, over
    the given model(s) (0 if DDP kept them identical, as it should)."""
    if world < 2:
        return
    models = models if isinstance(models, (list, tuple)) else [models]
    flat = torch.cat([p.detach().flatten() for m in models for p in m.parameters()])
    ref = flat.clone()
    torch.distributed.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    print0(f"DDP check: max weight difference across {world} ranks = {diff.item():.3g}")


def teardown_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def peak_memory_gb(device):
    """Peak memory so far, GiB: allocated on the GPU, or the process's peak RSS on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def free_memory(device):
    """Bytes free for this process: on the GPU, the driver's count; on the CPU, MemAvailable."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def print0(*args, **kwargs):
    """print on rank 0 only (every process prints when not distributed)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# --------------------------------------------------------------------------- progress
def bar(iterable=None, **kwargs):
    """A tqdm bar on rank 0's terminal; none in a log file, under pytest or on other ranks
    (the stages also print lines, so a log still shows progress)."""
    from tqdm import tqdm
    quiet = int(os.environ.get("RANK", 0)) != 0 or not sys.stderr.isatty()
    return tqdm(iterable, disable=quiet, leave=False, dynamic_ncols=True, **kwargs)


def duration(seconds):
    """0.53 s, 42 s, 3.5 min, 2.1 h, 4.0 days."""
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} days"


def first_step_line(device, t0, step, total, log_every, what="step", prefix=""):
    """Printed once, after the first step of a run (begun at time t0, now at `step` of `total`): its
    time and the rest of the run at that pace, so a run that takes days on a CPU says so at once.
    One host sync, once per run."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    left = total - step
    nxt = min(total, -(-step // log_every) * log_every)  # the next logged step
    then = f"; next line at {what} {nxt}" if nxt > step else ""
    plural = "s" if left != 1 else ""
    print0(f"{prefix}{what} {step} took {duration(dt)} (with warm-up); {left} {what}{plural} more at this "
           f"pace: about {duration(dt * left)}{then}")


def eta(ms_per_step, steps_left):
    return f"eta {duration(ms_per_step * steps_left / 1000)}" if steps_left > 0 else "done"


def sizing_note(device, sized, cpu_sized):
    """The start-up line on a CPU when the settings are sized for a GPU (`sized`, e.g. the paper's
    defaults), naming the CPU-sized ones (those of `make demo` and the README's CPU recipe)."""
    if torch.device(device).type == "cpu" and sized:
        print0(f"note: on the CPU with GPU-sized settings ({sized}): expect hours to days. CPU-sized, as in "
               f"`make demo` and the README's CPU recipe: {cpu_sized}")


# --------------------------------------------------------------------------- previews
# One convention for every preview, drawn as a legend under the image. 01's label maps use AbdomenCT-1K's
# numbers (plus 5 for a tumour); 02's priori masks are 1 organ (the pancreas by default) / 2 tumour. A
# structure keeps its colour from stage to stage: the organ of interest is gold, a tumour magenta.
ORGANS = {"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4, "tumour": 5}
LABEL_NAMES = {v: k for k, v in ORGANS.items()}
MASK_NAMES = {1: "organ", 2: "tumour"}
COLOURS = {"liver": "tab:red", "kidney": "tab:green", "spleen": "tab:blue", "pancreas": "gold",
           "organ": "gold", "tumour": "magenta", "organ box": "cyan"}


def soft_tissue(prep=None, hu=None):
    """The display window -200..300 HU on the [0, 1] scale of 01's HU window: `hu` (lo, hi) when given,
    else prep/config.json's "hu", else the paper's [-1000, 400]. For previews only."""
    cfg = Path(prep) / "config.json" if prep is not None else None
    if hu is None:
        hu = json.loads(cfg.read_text())["hu"] if cfg is not None and cfg.is_file() else (-1000.0, 400.0)
    lo, hi = hu
    return max(0.0, (-200 - lo) / (hi - lo)), min(1.0, (300 - lo) / (hi - lo))


def save_preview(path, images, labels=None, titles=None, spacing=(1.0, 1.0, 1.0), vrange=(0.0, 1.0),
                 centres=None, names=LABEL_NAMES):
    """PNG of the axial, coronal and sagittal slices through the middle (or `centres`), one row per volume.

    images: a (D, H, W) array/tensor or a list of them (network layout, RAS axes);
    labels: matching integer volumes (or None) drawn as contours, coloured by `names` (label -> name:
    LABEL_NAMES for 01's label maps, MASK_NAMES for 02's masks) with COLOURS, and a legend underneath;
    spacing: (dz, dy, dx) in mm, for the aspect ratio of coronal and sagittal views;
    centres: a (z, y, x) voxel per row where the three slices cross (None: the middle), e.g. an
    organ's centroid.
    Shown in radiological convention: anterior up, the patient's right on the image's left.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    as_np = lambda v: None if v is None else (v.detach().float().cpu().numpy() if torch.is_tensor(v)
                                              else np.asarray(v))
    images = [images] if not isinstance(images, (list, tuple)) else list(images)
    labels = [labels] * len(images) if not isinstance(labels, (list, tuple)) else list(labels)
    titles = titles if isinstance(titles, (list, tuple)) else [titles] * len(images)
    dz, dy, dx = spacing
    fig, axes = plt.subplots(len(images), 3, figsize=(9, 3.2 * len(images)), squeeze=False)
    centres = centres if centres is not None else [None] * len(images)
    shown = set()
    for row, (img, lab, title, centre) in enumerate(zip(images, labels, titles, centres)):
        img, lab = as_np(img).squeeze(), as_np(lab)
        lab = None if lab is None else lab.squeeze()
        z, y, x = (int(round(c)) for c in centre) if centre is not None else (s // 2 for s in img.shape)
        views = [  # (slice, aspect, name); flips give anterior-up / patient-right-left / superior-up
            (lambda v: v[z][::-1, ::-1], dy / dx, f"axial z={z}"),
            (lambda v: v[:, y][::-1, ::-1], dz / dx, f"coronal y={y}"),
            (lambda v: v[:, :, x][::-1, ::-1], dz / dy, f"sagittal x={x}"),
        ]
        for col, (take, aspect, name) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(take(img), cmap="gray", vmin=vrange[0], vmax=vrange[1], aspect=aspect,
                      interpolation="nearest")
            if lab is not None:
                sl = take(lab)
                for k in sorted(set(np.unique(sl).tolist()) - {0}):
                    structure = names.get(int(k), f"label {int(k)}")
                    colour = COLOURS.get(structure, "tab:orange")
                    ax.contour(sl == k, levels=[0.5], colors=colour, linewidths=0.8)
                    shown.add(structure)
            ax.set_title(f"{title} · {name}" if title and col == 0 else name, fontsize=8)
            ax.axis("off")
    if shown:
        from matplotlib.lines import Line2D
        order = [n for n in COLOURS if n in shown] + sorted(shown - set(COLOURS))
        handles = [Line2D([], [], color=COLOURS.get(n, "tab:orange"), lw=2) for n in order]
        fig.legend(handles, order, loc="lower center", ncol=len(order), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.35 / (3.2 * len(images)), 1, 0.98))
    save_figure(fig, path, layout=not shown)


def save_figure(fig, path, dpi=90, layout=True):
    """Lay out a matplotlib figure (unless done), write it atomically (PNG from the suffix) and close it."""
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


# --------------------------------------------------------------------------- stage imports
def load_stage(name):
    """Import a numbered stage file (`load_stage("03_vqgan")`) as a module, once.

    Stage files start with digits, so `import` cannot name them; their work sits under
    `if __name__ == "__main__":`, so importing runs nothing.
    """
    if name in sys.modules:
        return sys.modules[name]
    path = REPO / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such stage")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
