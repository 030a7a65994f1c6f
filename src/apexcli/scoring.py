"""`apex score PATH...`: every requested reward on a set of image files.

Inputs: folders (their image files, not recursive: sub-folders, dangling symlinks, symlink
loops, hidden entries and other entries that are not image files are listed as skipped; only
the files apex writes beside images, such as metadata.jsonl, are passed over), files and globs
('DIR/**/*.png' recurses into real folders, never through a symlinked one: apexcli.walk).
Prompts, first match wins:
`--prompt TEXT` for every image; `--prompts FILE` (.jsonl lines or .csv rows with `file` and
`prompt`; `file` relative to FILE's folder, or a bare file name); `metadata.jsonl` next to the
images (the `apex sample` format: one JSON object per line with at least `file`, relative to
that folder, and `prompt`; a bad line there is a warning, not an error).

Images are decoded in batches of at most `batch_size` files and `max_batch_pixels` decoded
pixels (from their headers, before decoding), each image at most `max_pixels`.

Outputs under `out_dir`, each written to a temp file and renamed (never half-written); existing
ones are replaced only with `overwrite`. File names that are not valid UTF-8 are written with
their bad bytes as \\xNN (apexcli.display), and nothing printed carries a control character:
- scores.jsonl: one object per input file: {"file", "prompt", <objective>: float|null, ...,
  "error": reason|null, "info": {objective: {...}}}; strict JSON: a NaN score is null (no
  score), an infinite one is null with a note in "error" (a reward returned it).
- scores.csv: file, prompt, one column per objective, error.
Bad inputs are listed with their reason (in both files and on stderr); the run fails only
when no image could be scored, or with `strict` when any input was bad.
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from apexcli.console import make_console
from apexcli.display import markup_safe, printable, storable
from apexcli.errors import ApexError
from apexcli.fileio import atomic_write_text
from apexcli.images import (
    DEFAULT_BATCH_PIXELS,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    image_size,
    is_image_name,
    open_image,
)
from apexcli.jsonsafe import dumps, is_finite_number
from apexcli.rewards.config import RewardsConfig
from apexcli.rewards.registry import canonical_name, reward_spec
from apexcli.walk import recursive_glob

# The files apex itself writes beside images (`apex sample`'s metadata.jsonl, `apex score`'s
# outputs when --out is the image folder): passed over without a word, or every folder of
# sample output would report them. Every other entry that is not scored is listed as skipped.
APEX_SIDECARS = frozenset({"metadata.jsonl", "scores.jsonl", "scores.csv"})
OUTPUT_FILES = ("scores.jsonl", "scores.csv")
HIDDEN = "hidden (its name starts with '.'); name the file to score it"
UNFOLLOWED_LINK = (
    "symlink to a folder, not followed by a recursive glob (a link back up would repeat "
    "every image); pass it on its own to score what it holds"
)


@dataclass
class ScoreReport:
    """What `score_paths` did."""

    objectives: list[str]  # canonical names, column order
    rows: list[dict[str, Any]]  # one per input file, as written to scores.jsonl
    issues: list[tuple[str, str]]  # (file, reason) for every bad input
    summary: dict[str, dict[str, float]]  # objective -> n, mean, std, min, max over finite scores
    files: list[str] = field(default_factory=list)  # the output files written

    @property
    def n_scored(self) -> int:
        return sum(1 for r in self.rows if any(is_finite_number(r.get(o)) for o in self.objectives))


def _unusable(path: str) -> str | None:
    """Why `path` (a folder entry or a matched path) cannot be scored, or None if it is a file."""
    if os.path.islink(path) and not os.path.exists(path):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symlink loop"
        return f"dangling symlink (its target {storable(os.readlink(path))!r} does not exist)"
    if os.path.isdir(path):
        return "sub-folder, not scanned (folders are not recursive: pass it too, or a glob like 'DIR/**/*.png')"
    if not os.path.isfile(path):
        return "not a regular file"
    return None


def _match(raw: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """One PATH argument -> ([(path, how)], skipped): how is "named" (given as is), "glob" (a
    plain glob's match; a matched folder is listed) or "walk" (a recursive glob's match; its
    folders were walked already)."""
    if os.path.lexists(raw):  # an existing name is itself, even with [ or * in it
        return [(raw, "named")], []
    if not glob.has_magic(raw):
        raise ApexError(f"{printable(raw)!r} matches no file or folder")
    if "**" not in raw:
        matches = sorted(glob.glob(raw))
        if not matches:
            raise ApexError(f"{printable(raw)!r} matches no file or folder")
        return [(m, "glob") for m in matches], []
    matches, links = recursive_glob(raw)
    if not matches and not links:
        raise ApexError(f"{printable(raw)!r} matches no file or folder")
    return [(m, "walk") for m in matches], [(link, UNFOLLOWED_LINK) for link in links]


def _reason(path: str, found: bool) -> str | None:
    """Why a candidate is skipped, None to score it. `found`: in a folder or by a glob (a file
    named on the command line is tried whatever its name)."""
    name = os.path.basename(path)
    if found and name.startswith("."):
        return HIDDEN
    reason = _unusable(path)
    if reason is None and found and not is_image_name(path):
        return f"not an image file (extension {os.path.splitext(path)[1].lower() or 'none'})"
    return reason


def expand_paths(paths: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Folders, files and globs -> (candidate files in order, without duplicates; skipped entries
    with reason). Every entry of a folder that is not scored is listed with its reason (hidden,
    not an image extension, sub-folder, dangling symlink, symlink loop, fifo), except the files
    apex writes beside images (APEX_SIDECARS). Recursive globs never follow a symlinked folder
    (apexcli.walk): it is listed as skipped instead."""
    matched: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for raw in paths:
        found, links = _match(os.path.expanduser(raw))
        matched += found
        skipped += links
    folders = {os.path.abspath(m) for m, _ in matched if os.path.isdir(m)}
    entries: list[tuple[str, bool]] = []
    for path, how in matched:
        if how != "walk" and os.path.isdir(path):
            entries += [
                (os.path.join(path, name), True)
                for name in sorted(os.listdir(path))
                if os.path.abspath(os.path.join(path, name)) not in folders
            ]
        elif how == "walk" and os.path.isdir(path):
            if os.path.islink(path):  # a real folder needs nothing: the walk took its entries in
                skipped.append((path, UNFOLLOWED_LINK))
        else:
            entries.append((path, how != "named"))
    files: list[str] = []
    for path, found in entries:
        if found and os.path.basename(path) in APEX_SIDECARS and _unusable(path) is None:
            continue
        reason = _reason(path, found)
        if reason is None:
            files.append(path)
        else:
            skipped.append((path, reason))
    return _unique(files, lambda f: f), _unique(skipped, lambda item: item[0])


def _unique(items: list, path_of) -> list:
    """`items` in order, without a second entry for the same absolute path."""
    seen: set[str] = set()
    out = []
    for item in items:
        key = os.path.abspath(path_of(item))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _read_mapping(path: str, bad_lines: list[str] | None = None) -> dict[str, str]:
    """A .jsonl or .csv file of {file, prompt} -> {absolute path or bare name: prompt}.

    A line that is not a JSON object with 'file' and 'prompt' (or not UTF-8) is an ApexError,
    or, when `bad_lines` is given, described there and passed over."""
    base = os.path.dirname(os.path.abspath(path))
    entries: list[tuple[str, str]] = []
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ApexError(f"cannot read prompts file {path} ({exc.strerror})") from None
    if path.lower().endswith(".csv"):
        try:
            reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
        except UnicodeDecodeError as exc:
            raise ApexError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        if not reader.fieldnames or not {"file", "prompt"} <= set(reader.fieldnames):
            raise ApexError(f"{path}: the CSV header must have 'file' and 'prompt' columns")
        entries = [(row["file"], row["prompt"]) for row in reader]
    else:
        for n, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
                entries.append((str(obj["file"]), str(obj["prompt"])))
            except (ValueError, KeyError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
                problem = f"{path}:{n}: expected a JSON object with 'file' and 'prompt'"
                if bad_lines is None:
                    raise ApexError(problem) from None
                bad_lines.append(problem)
    mapping: dict[str, str] = {}
    for file, prompt in entries:
        mapping[os.path.abspath(os.path.join(base, file))] = prompt
        mapping.setdefault(os.path.basename(file), prompt)
    return mapping


class PromptLookup:
    """Finds the prompt of an image: --prompt, then --prompts FILE, then metadata.jsonl beside it.

    A bad line of a --prompts FILE is an error (the user chose that file); a bad line of a
    metadata.jsonl found beside the images is passed to `warn` and skipped, so that objectives
    needing no prompt still score and the images of that line alone lack a prompt."""

    def __init__(self, prompt: str | None, prompts_file: str | None, warn=lambda message: None):
        self.prompt = prompt
        self.mapping = _read_mapping(prompts_file) if prompts_file else None
        self.warn = warn
        self._folders: dict[str, dict[str, str]] = {}

    def __call__(self, path: str) -> str | None:
        if self.prompt is not None:
            return self.prompt
        full = os.path.abspath(path)
        if self.mapping is not None:
            return self.mapping.get(full, self.mapping.get(os.path.basename(path)))
        folder = os.path.dirname(full)
        if folder not in self._folders:
            meta = os.path.join(folder, "metadata.jsonl")
            bad: list[str] = []
            self._folders[folder] = _read_mapping(meta, bad) if os.path.isfile(meta) else {}
            for problem in bad:
                self.warn(problem)
        return self._folders[folder].get(full)


def summarize(rows: list[dict[str, Any]], objectives: list[str]) -> dict[str, dict[str, float]]:
    """n, mean, population std, min, max of the finite scores of each objective."""
    out = {}
    for name in objectives:
        vals = [r[name] for r in rows if is_finite_number(r.get(name))]
        n = len(vals)
        mean = sum(vals) / n if n else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n) if n else math.nan
        out[name] = {
            "n": n,
            "mean": mean,
            "std": std,
            "min": min(vals) if n else math.nan,
            "max": max(vals) if n else math.nan,
        }
    return out


def write_outputs(out_dir: str, rows: list[dict[str, Any]], objectives: list[str]) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    jsonl = "".join(dumps(r, ensure_ascii=False) + "\n" for r in rows)  # NaN/inf anywhere -> null
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "prompt", *objectives, "error"])
    for r in rows:
        writer.writerow(
            [
                r["file"],
                r["prompt"] or "",
                *("" if r.get(o) is None else repr(float(r[o])) for o in objectives),
                r["error"] or "",
            ]
        )
    paths = [os.path.join(out_dir, "scores.jsonl"), os.path.join(out_dir, "scores.csv")]
    atomic_write_text(paths[0], jsonl)
    atomic_write_text(paths[1], buf.getvalue())
    return paths


def summary_table(summary: dict[str, dict[str, float]], n_files: int, n_bad: int) -> Table:
    table = Table(title=f"apex score: {n_files} files, {n_bad} with problems")
    for col in ("objective", "n", "mean", "std", "min", "max"):
        table.add_column(col, justify="left" if col == "objective" else "right")
    for name, s in summary.items():
        table.add_row(name, str(s["n"]), *(f"{s[k]:.4f}" for k in ("mean", "std", "min", "max")))
    return table


def check_outputs_free(out_dir: str, overwrite: bool) -> None:
    """ApexError when `out_dir` already holds scores of an earlier run and `overwrite` is off:
    the default --out is the working folder, where a second `apex score` would otherwise
    replace the first one's results without a word."""
    if overwrite:
        return
    existing = [name for name in OUTPUT_FILES if os.path.lexists(os.path.join(out_dir, name))]
    if existing:
        where = printable(os.path.join(out_dir, existing[0]))
        raise ApexError(
            f"'{where}' exists (an earlier apex score); pass --overwrite to replace it, or choose another --out"
        )


def plan_batches(
    files: Sequence[str], batch_size: int, max_batch_pixels: int
) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """Files -> (batches of at most `batch_size` files and `max_batch_pixels` decoded pixels in
    all, from the headers alone; files too large for any batch, with the reason). A file whose
    header cannot be read counts 0 pixels: decoding it then fails with its own reason."""
    batches: list[list[str]] = []
    too_large: list[tuple[str, str]] = []
    batch: list[str] = []
    pixels = 0
    for path in files:
        size = image_size(path)
        n = size[0] * size[1] if size else 0
        if n > max_batch_pixels:
            too_large.append(
                (
                    path,
                    f"too large for one scoring batch: {size[0]}x{size[1]} = {n} pixels > "
                    f"--max-batch-pixels {max_batch_pixels}; raise it to score this image",
                )
            )
            continue
        if batch and (len(batch) >= batch_size or pixels + n > max_batch_pixels):
            batches.append(batch)
            batch, pixels = [], 0
        batch.append(path)
        pixels += n
    if batch:
        batches.append(batch)
    return batches, too_large


def _empty_row(path: str, names: Sequence[str], reason: str) -> dict[str, Any]:
    return {"file": storable(path), "prompt": None, **{n: None for n in names}, "error": reason}


def _scored_row(
    path: str, prompt: str | None, scores: Sequence[float], objectives: Sequence[str], prompt_needing: Sequence[str]
) -> dict[str, Any]:
    """One image's row: a score per objective (null when not finite or missing its prompt)."""
    row: dict[str, Any] = {"file": storable(path), "prompt": None if prompt is None else storable(prompt)}
    problems = []
    for name, v in zip(objectives, scores):
        if math.isinf(v):  # a reward bug, not "no score": JSON has no inf, so null and a note
            problems.append(f"{name} returned {v}, written as null")
        row[name] = None if (not math.isfinite(v) or (prompt is None and name in prompt_needing)) else v
    if prompt is None and prompt_needing:
        problems.append(
            f"no prompt (needed by {', '.join(prompt_needing)}); "
            "give --prompt, --prompts FILE or a metadata.jsonl beside the images"
        )
    row["error"] = "; ".join(problems) or None
    return row


def _check_limits(batch_size: int, max_pixels: int, max_batch_pixels: int) -> None:
    for flag, value in (
        ("--batch-size", batch_size),
        ("--max-pixels", max_pixels),
        ("--max-batch-pixels", max_batch_pixels),
    ):
        if value < 1:
            raise ApexError(f"{flag} must be at least 1, got {value}")


def _score_batch(
    suite,
    good: list[tuple[str, Any]],
    prompts: list[str | None],
    prompt_needing: list[str],
    report: Callable[[str, str, str], None],
) -> list[dict[str, Any]]:
    """One decoded batch through the suite: a row per image, with each reward's per-image extras;
    a row whose scores cannot stand (no prompt for a reward that needs one) is reported."""
    R, info = suite([im for _, im in good], [p or "" for p in prompts])
    rows = []
    for i, ((path, _), p) in enumerate(zip(good, prompts)):
        row = _scored_row(path, p, [float(v) for v in R[i]], suite.objectives, prompt_needing)
        if row["error"]:
            report(path, row["error"], "problem")
        extras = {
            name: {key: vals[i] for key, vals in info[name].items() if len(vals) == len(good)}
            for name in suite.objectives
            if info.get(name)
        }
        if extras:
            row["info"] = extras
        rows.append(row)
    return rows


def score_paths(
    paths: Sequence[str],
    *,
    objectives: Sequence[str],
    out_dir: str = ".",
    prompt: str | None = None,
    prompts_file: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    config: RewardsConfig | None = None,
    batch_size: int = 32,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    err_console: Console | None = None,
) -> ScoreReport:
    """Score image files on `objectives`; write scores.jsonl/csv under `out_dir` (refused when
    they exist, unless `overwrite`); return the report. Everything printed goes through
    `markup_safe`: a file name cannot send control sequences to the terminal."""
    from apexcli.rewards.runtime import resolve_device_dtype
    from apexcli.rewards.suite import RewardSuite

    console = console or make_console()
    err_console = err_console or make_console(stderr=True)
    out_dir = os.path.expanduser(out_dir)
    if isinstance(objectives, str):
        objectives = [o for o in objectives.split(",") if o.strip()]
    names = [canonical_name(o) for o in objectives]  # fail on a typo before loading anything
    prompt_needing = [n for n in names if reward_spec(n).needs_prompt]
    _check_limits(batch_size, max_pixels, max_batch_pixels)
    check_outputs_free(out_dir, overwrite)
    files, skipped = expand_paths(paths)
    batches, too_large = plan_batches(files, batch_size, max_batch_pixels)
    lookup = PromptLookup(
        prompt,
        prompts_file,
        warn=lambda message: err_console.print(
            f"[yellow]warning[/] {markup_safe(message)}; skipped that line", highlight=False
        ),
    )
    dev, dt = resolve_device_dtype(device, dtype)

    rows: list[dict[str, Any]] = []
    issues: list[tuple[str, str]] = []

    def report(path: str, reason: str, label: str = "skipped") -> None:
        issues.append((storable(path), reason))
        err_console.print(f"[yellow]{label}[/] {markup_safe(path)}: {markup_safe(reason)}", highlight=False)

    for path, reason in skipped + too_large:
        report(path, reason)
        rows.append(_empty_row(path, names, reason))

    def load(path: str) -> tuple[str, Any]:
        try:
            return path, open_image(path, max_pixels)
        except ImageLoadError as exc:
            return path, str(exc)

    with (
        RewardSuite(objectives, device=dev, dtype=dt, config=config) as suite,
        ThreadPoolExecutor(max_workers=4, thread_name_prefix="apex-decode") as decoder,
        Progress(
            TextColumn("scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            disable=not progress,
        ) as bar,
    ):
        task = bar.add_task("score", total=sum(len(b) for b in batches))
        for chunk in batches:
            good, good_prompts = [], []
            for path, result in decoder.map(load, chunk):
                if isinstance(result, str):
                    report(path, result)
                    rows.append(_empty_row(path, names, result))
                else:
                    good.append((path, result))
                    good_prompts.append(lookup(path))
            if good:
                rows += _score_batch(suite, good, good_prompts, prompt_needing, report)
            bar.advance(task, len(chunk))

    summary = summarize(rows, names)
    report_obj = ScoreReport(names, rows, issues, summary)
    report_obj.files = write_outputs(out_dir, rows, names)
    console.print(summary_table(summary, len(rows), len(issues)))
    console.print(f"wrote {markup_safe(report_obj.files[0])} and {markup_safe(report_obj.files[1])}", highlight=False)
    if report_obj.n_scored == 0:
        raise ApexError(
            f"no image could be scored ({len(rows)} inputs, {len(issues)} with problems; "
            f"reasons in {report_obj.files[0]})"
        )
    if strict and issues:
        raise ApexError(f"{len(issues)} input(s) had problems (--strict); first: {issues[0][0]}: {issues[0][1]}")
    return report_obj
