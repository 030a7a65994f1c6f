"""Can this config run here? Cheap checks of the environment, one row each, before anything heavy.

``apex doctor`` shows every row; ``apex train`` calls ``preflight`` and stops at the first
failing one, so a missing model or a reward server that is down costs seconds, not a model load.
Each check is a function ``Config -> list[Row]`` in ``CHECKS``: adding a check is one line there.
Nothing here downloads, loads a model or prints.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from apexcli.config import Config, resolve_config
from apexcli.errors import ApexError
from apexcli.rewards.config import RewardsConfig

Status = Literal["ok", "warn", "FAIL"]
OK: Status = "ok"
WARN: Status = "warn"
FAIL: Status = "FAIL"

# The packages whose supported ranges matter to training; the ranges come from apexcli's metadata.
CHECKED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate")
HUB_TIMEOUT_S = 3.0  # one hub question, only when weights are not cached and the hub is not off
REMOTE_TIMEOUT_S = 3.0  # a reward server's health answer (loopback answers in milliseconds)
DISK_WARN_BYTES = 5 * 2**30  # checkpoints, eval images and a text cache of a real run fit in this
DISK_FLOOR_BYTES = 256 * 2**20  # under this even a tiny run's checkpoints may not fit


@dataclass(frozen=True)
class Row:
    """One check's verdict: what was found and, when it fails, the one thing that fixes it."""

    name: str
    status: Status
    found: str
    fix: str = ""


Check = Callable[[Config], list[Row]]


# ---------------------------------------------------------------------------------------------
# python and packages
# ---------------------------------------------------------------------------------------------


def installed_version(package: str) -> str | None:
    """The installed distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def apex_requirements() -> tuple[str, dict[str, Requirement]] | None:
    """apexcli's Requires-Python and its unconditional requirements by name, read from the
    installed metadata (pyproject.toml's one list); None when apexcli is not installed."""
    try:
        meta = importlib.metadata.metadata("apexcli")
        texts = importlib.metadata.requires("apexcli") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    reqs = (Requirement(text) for text in texts)
    return meta.get("Requires-Python") or "", {canonicalize_name(r.name): r for r in reqs if r.marker is None}


def _not_installed_row(name: str) -> Row:
    return Row(name, WARN, "apexcli is not installed, so its supported versions are unknown", "pip install -e .")


def python_rows(cfg: Config) -> list[Row]:
    """The interpreter against apexcli's Requires-Python."""
    meta = apex_requirements()
    if meta is None:
        return [_not_installed_row("python")]
    version, spec = platform.python_version(), SpecifierSet(meta[0])
    found = f"{version} (needs {spec})"
    if spec.contains(version, prereleases=True):
        return [Row("python", OK, found)]
    return [Row("python", FAIL, found, f"make install PYTHON=python3.X (a Python {spec})")]


def package_rows(cfg: Config) -> list[Row]:
    """torch, diffusers, transformers, peft and accelerate against apexcli's declared ranges."""
    meta = apex_requirements()
    if meta is None:
        return [_not_installed_row("packages")]
    declared = meta[1]
    return [_package_row(declared[key]) for key in map(canonicalize_name, CHECKED_PACKAGES) if key in declared]


def _package_row(req: Requirement) -> Row:
    version, fix = installed_version(req.name), f"pip install '{req}'"
    if version is None:
        return Row(req.name, FAIL, f"not installed (needs {req.specifier})", fix)
    found = f"{version} (needs {req.specifier})"
    if req.specifier.contains(version, prereleases=True):
        return Row(req.name, OK, found)
    return Row(req.name, FAIL, found, fix)


# ---------------------------------------------------------------------------------------------
# device
# ---------------------------------------------------------------------------------------------


def device_rows(cfg: Config) -> list[Row]:
    """The device model.device names exists here; on a GPU its name, memory and bf16 support."""
    import torch

    wanted = cfg.model.device
    try:
        device = torch.device("cuda" if wanted == "auto" else wanted)
    except RuntimeError:
        return [Row("device", FAIL, f"model.device={wanted} is not a device name", "model.device=auto")]
    if not torch.cuda.is_available():
        found = f"CPU only (no CUDA GPU; torch CUDA build: {torch.version.cuda or 'none'}); model.device={wanted}"
        if device.type == "cuda" and wanted != "auto":
            return [Row("device", FAIL, found, "model.device=cpu")]
        return [Row("device", OK, found)]
    if device.type != "cuda":
        return [
            Row(
                "device",
                OK,
                f"model.device={wanted}: the CPU, though {torch.cuda.device_count()} CUDA GPU(s) are visible",
            )
        ]
    return _gpu_rows(cfg, device.index if device.index is not None else torch.cuda.current_device())


def _gpu_rows(cfg: Config, index: int) -> list[Row]:
    import torch

    count = torch.cuda.device_count()
    if index >= count:
        return [
            Row(
                "device",
                FAIL,
                f"model.device={cfg.model.device} but only {count} CUDA GPU(s) are visible",
                "model.device=cuda:0",
            )
        ]
    props = torch.cuda.get_device_properties(index)
    rows = [
        Row(
            "device",
            OK,
            f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}",
        )
    ]
    if cfg.model.dtype == "bfloat16":
        rows.append(_bf16_row(props.major))
    return rows


def _bf16_row(major: int) -> Row:
    """bf16 runs natively from compute capability 8 (Ampere) on; older GPUs emulate it, slowly."""
    if major >= 8:
        return Row("bf16", OK, "model.dtype=bfloat16: native on this GPU")
    return Row(
        "bf16",
        WARN,
        "model.dtype=bfloat16 is emulated on this GPU (compute capability < 8): slow",
        "model.dtype=float16",
    )


# ---------------------------------------------------------------------------------------------
# weights: local folders and the Hugging Face hub cache
# ---------------------------------------------------------------------------------------------


def _local_row(name: str, source: str, filename: str, option: str, *, file_ok: bool = False) -> Row:
    """A folder that must hold ``filename`` (or, with ``file_ok``, that file itself)."""
    path = Path(source).expanduser()
    fix = f"{option}=DIR, DIR holding {filename}"
    if not path.exists():
        return Row(name, FAIL, f"{option}={source}: no such file or folder", fix)
    if file_ok and path.is_file():
        return Row(name, OK, f"{source} (local file)")
    if not (path / filename).is_file():
        return Row(name, FAIL, f"{option}={source} has no {filename}", fix)
    return Row(name, OK, f"{source} (local folder)")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, whether huggingface_hub read it at import or it was set since."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


@functools.cache
def hub_refusal(repo_id: str, revision: str | None) -> str | None:
    """Why the hub would not serve ``repo_id`` here (None: it answers, so loading downloads it).
    Asked once per repo and process, with a short timeout."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # unreachable, unknown repo, refused token: all mean "no download here"
        return f"the hub did not answer for it ({type(exc).__name__})"
    return None


def _hub_row(name: str, repo_id: str, filename: str, option: str, revision: str | None, local_only: bool) -> Row:
    """A hub id: found in the local cache (never downloaded here), or why loading would fail."""
    from huggingface_hub import constants, try_to_load_from_cache

    fix = f"huggingface-cli download {repo_id} --local-dir DIR, then {option}=DIR"
    try:
        hit = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # not a valid repo id, and no such folder either
        return Row(
            name, FAIL, f"{option}={repo_id} is neither a folder nor a hub id", f"{option}=DIR, DIR holding {filename}"
        )
    if isinstance(hit, str):
        return Row(name, OK, f"{repo_id} (hub cache)")
    missing = f"{repo_id} is not in the hub cache ({constants.HF_HUB_CACHE})"
    if local_only:
        return Row(name, FAIL, f"{missing} and model.local_files_only is set", fix)
    if hub_offline():
        return Row(name, FAIL, f"{missing} and HF_HUB_OFFLINE is set", fix)
    refusal = hub_refusal(repo_id, revision)
    if refusal:
        return Row(name, FAIL, f"{missing} and {refusal}", fix)
    return Row(name, WARN, f"{missing}; the hub answers, so loading downloads it first", fix)


def _reward_weights_row(name: str, source: str, filename: str, option: str, *, file_ok: bool = False) -> Row:
    """A reward's weights: a local path when one exists or the name looks like one (as
    from_pretrained decides), else a hub id."""
    from apexcli.rewards.hub import looks_local

    if os.path.exists(os.path.expanduser(source)) or looks_local(source):
        return _local_row(name, source, filename, option, file_ok=file_ok)
    return _hub_row(name, source, filename, option, None, False)


def _worst(name: str, rows: list[Row]) -> Row:
    """One row for several sources: the first failure, else the first warning, else all found."""
    for status in (FAIL, WARN):
        for row in rows:
            if row.status == status:
                return row
    return Row(name, OK, "; ".join(row.found for row in rows))


def model_rows(cfg: Config) -> list[Row]:
    """model.pretrained read as load_pipeline reads it, without loading anything."""
    from apexcli.models.sources import BUILT_IN, MINI_DIR, looks_like_path

    m, name = cfg.model, "model"
    if m.pretrained in BUILT_IN:
        return [Row(name, OK, f"{m.pretrained}: random weights built in code")]
    if m.pretrained == "mini":
        if (MINI_DIR / "model_index.json").is_file():
            return [Row(name, OK, f"mini: packaged in {MINI_DIR}")]
        return [Row(name, FAIL, f"mini: {MINI_DIR} has no model_index.json", "make mini-weights")]
    if looks_like_path(m.pretrained):
        return [_local_row(name, m.pretrained, "model_index.json", "model.pretrained")]
    return [_hub_row(name, m.pretrained, "model_index.json", "model.pretrained", m.revision, m.local_files_only)]


# ---------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------


def _rapidocr_row(name: str, rewards: RewardsConfig) -> Row:
    """RapidOCR with the ONNX models its wheel ships in ``rapidocr/models`` (where RapidOCR
    looks when no model path is configured): without them it would try to download them."""
    missing = [m for m in ("rapidocr", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return Row(name, FAIL, f"{' and '.join(missing)} not installed", "pip install rapidocr onnxruntime")
    spec = importlib.util.find_spec("rapidocr")
    models = Path(list(spec.submodule_search_locations or [])[0]) / "models"
    kinds = ("det", "rec") if rewards.ocr.upside_down == "read" else ("det", "rec", "cls")
    found = {kind: sorted(p.name for p in models.glob(f"*{kind}*.onnx")) for kind in kinds}
    absent = [kind for kind, files in found.items() if not files]
    if absent:
        return Row(
            name,
            FAIL,
            f"rapidocr's {'/'.join(absent)} model missing from {models}",
            "pip install --force-reinstall rapidocr",
        )
    names = ", ".join(files[0] for files in found.values())
    return Row(name, OK, f"rapidocr {installed_version('rapidocr')}, packaged models {names}")


def _paddleocr_row(name: str, rewards: RewardsConfig) -> Row:
    missing = [m for m in ("paddleocr", "paddle") if importlib.util.find_spec(m) is None]
    if missing:
        return Row(
            name,
            FAIL,
            f"rewards.ocr.backend=paddleocr but {' and '.join(missing)} is not installed",
            "pip install 'apexcli[paddle]'",
        )
    return Row(name, OK, f"paddleocr {installed_version('paddleocr')} (it fetches its models on first use)")


def _ocr_row(name: str, rewards: RewardsConfig) -> Row:
    backend = _paddleocr_row if rewards.ocr.backend == "paddleocr" else _rapidocr_row
    return backend(name, rewards)


def _pick_row(name: str, rewards: RewardsConfig) -> Row:
    p = rewards.pick
    return _worst(
        name,
        [
            _reward_weights_row(name, p.source, "config.json", "rewards.pick.source"),
            _reward_weights_row(name, p.processor_source, "preprocessor_config.json", "rewards.pick.processor_source"),
        ],
    )


def _aes_row(name: str, rewards: RewardsConfig) -> Row:
    a = rewards.aes
    return _worst(
        name,
        [
            _reward_weights_row(name, a.clip_source, "config.json", "rewards.aes.clip_source"),
            _reward_weights_row(name, a.head_source, a.head_filename, "rewards.aes.head_source", file_ok=True),
        ],
    )


def _deqa_row(name: str, rewards: RewardsConfig) -> Row:
    d = rewards.deqa
    if not d.trust_remote_code:
        return Row(
            name,
            FAIL,
            f"deqa runs Python code shipped with {d.source} and rewards.deqa.trust_remote_code is false",
            "rewards.deqa.trust_remote_code=true",
        )
    return _reward_weights_row(name, d.source, "config.json", "rewards.deqa.source")


# In-process rewards that load something; every other registered reward is weight-free.
LOCAL_REWARD_CHECKS: dict[str, Callable[[str, RewardsConfig], Row]] = {
    "ocr": _ocr_row,
    "pick": _pick_row,
    "aes": _aes_row,
    "deqa": _deqa_row,
}


def _remote_row(name: str, key: str, url: str, rewards: RewardsConfig) -> Row:
    """The client's own health call (``RemoteReward``), with a short timeout and no retries."""
    from apexcli.rewards.config import RemoteConfig
    from apexcli.rewards.remote import TOKEN_ENV, RemoteReward, serve_command

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Row(name, FAIL, f"{key}@{url}: not an http:// URL", f"{key}@http://127.0.0.1:18086")
    quick = RemoteConfig(timeout_s=min(rewards.remote.timeout_s, REMOTE_TIMEOUT_S), retries=0, backoff_s=0.0)
    try:
        RemoteReward(key, url, quick)
    except ApexError as exc:
        if TOKEN_ENV in str(exc):
            return Row(name, FAIL, str(exc), f"export {TOKEN_ENV}=TOKEN (the token the server was started with)")
        port = str(parts.port or (443 if parts.scheme == "https" else 80))
        start = serve_command(key).replace("PORT", port)
        where = "" if parts.hostname in ("127.0.0.1", "localhost", "::1") else f"on {parts.hostname}: "
        return Row(name, FAIL, str(exc).split("; ")[0], where + start)
    return Row(name, OK, f"served by {url}")


def _is_known(objective: str) -> bool:
    from apexcli.rewards.registry import canonical_name

    try:
        canonical_name(objective)
    except ApexError:
        return False
    return True


def _unknown_objective_row(objective: str, error: ApexError, objectives: list[str]) -> Row:
    """The fix keeps the known objectives and drops the unknown ones."""
    known = [o for o in objectives if _is_known(o)]
    return Row(f"reward {objective}", FAIL, str(error), f"--objectives {','.join(known) or 'brightness,contrast'}")


def _objective_row(objective: str, cfg: Config) -> Row:
    from apexcli.rewards.registry import REWARD_NAMES, resolve_objective, reward_spec

    try:
        key, url = resolve_objective(objective)
    except ApexError as exc:
        return _unknown_objective_row(objective, exc, cfg.objectives)
    name = f"reward {key}"
    if url:
        return _remote_row(name, key, url, cfg.rewards)
    if key not in REWARD_NAMES:
        spec = reward_spec(key)
        return Row(
            name, OK, f"{spec.module}.{spec.cls} imported (from outside apex; its own checks run when it is built)"
        )
    check = LOCAL_REWARD_CHECKS.get(key)
    return check(name, cfg.rewards) if check else Row(name, OK, "weight-free: nothing to load")


def objective_rows(cfg: Config) -> list[Row]:
    """Each objective's backend: packages, weights on disk, or its reward server answering; also
    the objectives only evaluation scores (eval.objectives), which load at the first evaluation."""
    rows = [_objective_row(objective, cfg) for objective in cfg.objectives]
    if cfg.eval.every > 0:
        extra = [o for o in cfg.eval.objectives or [] if o not in cfg.objectives]
        rows += [dataclasses.replace(_objective_row(o, cfg), name=f"eval reward {o}") for o in extra]
    return rows


# ---------------------------------------------------------------------------------------------
# disk
# ---------------------------------------------------------------------------------------------


def _existing_parent(path: Path) -> Path:
    """The folder the run directory will be created in (or the run directory, if it exists)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_rows(cfg: Config) -> list[Row]:
    """Free space where the run is written: checkpoints must not fail mid-run on a full disk."""
    where = _existing_parent(Path(cfg.out))
    free = shutil.disk_usage(where).free
    found = f"{free / 2**30:.1f} GiB free at {where}"
    fix = f"--out DIR on a disk with {DISK_WARN_BYTES / 2**30:.0f}+ GiB free"
    if free < DISK_FLOOR_BYTES:
        return [Row("disk", FAIL, f"{found} (under {DISK_FLOOR_BYTES / 2**20:.0f} MiB)", fix)]
    if free < DISK_WARN_BYTES:
        return [Row("disk", WARN, f"{found} (under {DISK_WARN_BYTES / 2**30:.0f} GiB)", fix)]
    return [Row("disk", OK, found)]


# ---------------------------------------------------------------------------------------------
# running the checks
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# memory: the preset's plan against this GPU (or this host, on a CPU)
# ---------------------------------------------------------------------------------------------


def _host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _memory_fix(cfg: Config, plan, deqa_here: bool, capacity: int) -> str:
    """The first lever that brings the plan under ``capacity``, as one override."""
    if deqa_here and max(plan.peak(), plan.encoding_peak()) <= capacity:
        return "run DeQA behind its own server: deqa@http://HOST:PORT in --objectives (docs/guide/rewards.md)"
    if not cfg.model.gradient_checkpointing:
        return "model.gradient_checkpointing=true"
    if cfg.train.train_batch_size > 1:
        return f"train.train_batch_size={max(1, cfg.train.train_batch_size // 2)}"
    return "a GPU with more memory, or model.resolution smaller"


def _host_ram_row(found: str, need: int, host: int | None) -> Row | None:
    """A warning when the host's RAM is smaller than what loading the weights passes through it."""
    from apexcli.models.memory_plan import GB

    if host is None or need <= host:
        return None
    return Row(
        "memory",
        WARN,
        f"{found}; this host's RAM has {host / GB:.1f} GB",
        f"a host with at least {need / GB:.0f} GB of RAM: the weights load through it",
    )


def memory_rows(cfg: Config) -> list[Row]:
    """The memory plan (``apexcli.models.memory_plan``, computed on the meta device in seconds, for
    SD3.5 and FLUX.1 alike) against the GPU ``model.device`` names and the host RAM the weights
    load through; training on a CPU, everything against the host RAM. A GPU preset checked on a
    machine without a GPU gets the plan, the host check, and no GPU verdict."""
    from apexcli.models.sources import BUILT_IN

    if cfg.model.pretrained in BUILT_IN:
        return [Row("memory", OK, f"{cfg.model.pretrained}: a few MB, built in code")]
    import torch

    from apexcli.models.memory_plan import GB, plan_memory

    wants_gpu = cfg.model.device != "cpu"
    on_gpu = wants_gpu and torch.cuda.is_available()
    index = torch.device(cfg.model.device).index if cfg.model.device.startswith("cuda:") else None
    host = _host_ram_bytes()
    capacity = torch.cuda.get_device_properties(index or 0).total_memory if on_gpu else host
    try:  # under accelerate launch each process samples its share of a step (WORLD_SIZE of them)
        plan = plan_memory(cfg, capacity, world_size=max(1, int(os.environ.get("WORLD_SIZE", "1") or 1)))
    except ApexError as exc:  # an architecture the plan cannot read (a folder without transformer/config.json)
        return [Row("memory", WARN, f"no plan: {exc}")]
    deqa_here = any(o.partition("@")[0].strip() == "deqa" and "@" not in o for o in cfg.objectives)
    need = max(plan.peak(deqa_here), plan.encoding_peak(deqa_here))
    found = (
        f"plan: training peak {plan.peak(deqa_here) / GB:.1f} GB, while encoding prompts "
        f"{plan.encoding_peak(deqa_here) / GB:.1f} GB; host RAM while loading {plan.host_peak() / GB:.1f} GB"
    )
    if wants_gpu and not on_gpu:  # the device row already fails; judge only what this host does
        found += "; no GPU here to hold it"
        return [_host_ram_row(found, plan.host_peak(), host) or Row("memory", OK, found)]
    if capacity is None:
        return [Row("memory", OK, found)]
    where = "this GPU" if on_gpu else "this host's RAM"
    if need > capacity:
        return [
            Row(
                "memory",
                FAIL,
                f"{found}; {where} has {capacity / GB:.1f} GB",
                _memory_fix(cfg, plan, deqa_here, capacity),
            )
        ]
    short = _host_ram_row(found, plan.host_peak(), host) if on_gpu else None
    return [short or Row("memory", OK, f"{found}; {where} has {capacity / GB:.1f} GB")]


def gpu_memory_rows(cfg: Config) -> list[Row]:
    """``memory_rows`` where it decides whether a run fits (training on a GPU); nothing on a CPU,
    so ``apex train`` on a CPU does not spend seconds on a plan that cannot stop it."""
    import torch

    return memory_rows(cfg) if cfg.model.device != "cpu" and torch.cuda.is_available() else []


CHECKS: tuple[Check, ...] = (python_rows, package_rows, device_rows, model_rows, objective_rows, disk_rows, memory_rows)
PREFLIGHT: tuple[Check, ...] = (*CHECKS[:-1], gpu_memory_rows)
"""What ``apex train`` runs first: the same checks, the memory plan only when it trains on a GPU."""


def run_checks(cfg: Config) -> list[Row]:
    """Every check's rows, in order."""
    return [row for check in CHECKS for row in check(cfg)]


def diagnose(
    preset: str | None = None,
    config_file: str | Path | None = None,
    options: dict | None = None,
    overrides: list[str] | None = None,
) -> list[Row]:
    """The rows for the config ``apex train`` would build from the same layers."""
    return run_checks(resolve_config(preset=preset, config_file=config_file, options=options, overrides=overrides))


def preflight(cfg: Config) -> None:
    """Stop at the first failing check, before any model loads; later checks are not run."""
    for check in PREFLIGHT:
        for row in check(cfg):
            if row.status == FAIL:
                raise ApexError(f"{row.name}: {row.found}; fix: {row.fix}")
