"""`apex score`: a folder seeded with every kind of bad file; prompts from each source; outputs."""

import contextlib
import csv
import io
import json
import os
import random
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import typer
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from apexcli.commands.score import score as score_command
from apexcli.errors import ApexError
from apexcli.images import open_image
from apexcli.scoring import score_paths
from reward_models import save_tiny_aes, save_tiny_clip, save_tiny_deqa, text_image


def huge_png_header(width=100_000, height=100_000) -> bytes:
    """A valid PNG header declaring a huge image: a decompression bomb is refused before decoding."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def exif_rotated_jpeg(path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    img.save(path, format="JPEG", exif=exif.tobytes())


BAD = {
    "zero.png": "empty file",
    "truncated.png": "truncated",
    "corrupt.jpg": "not an image",
    "text.png": "not an image",
    "notes.xyz": "not an image file",
    "huge.png": "too large",
    "nometa.png": "no prompt",
}


@pytest.fixture()
def mixed(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    text_image("HELLO WORLD").save(d / "good.png")
    Image.new("RGB", (32, 24), (51, 102, 153)).save(d / "solid.jpg", quality=100)
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(d / "cmyk.jpg", quality=100)  # CMYK white
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(d / "gray16.png")  # 16-bit mid grey
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(d / "alpha.png")  # fully transparent black -> white
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(d / "palette.png", transparency=0)  # transparent index 0 -> white
    exif_rotated_jpeg(d / "exif.jpg")
    (d / "zero.png").write_bytes(b"")
    full = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "corrupt.jpg").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(300)))
    (d / "text.png").write_text("this is not a png")
    (d / "notes.xyz").write_text("notes")
    (d / "huge.png").write_bytes(huge_png_header())
    Image.new("RGB", (8, 8), "white").save(d / "nometa.png")
    names = [
        "good.png",
        "solid.jpg",
        "cmyk.jpg",
        "gray16.png",
        "alpha.png",
        "palette.png",
        "exif.jpg",
        "zero.png",
        "truncated.png",
        "corrupt.jpg",
        "text.png",
        "huge.png",
    ]
    with open(d / "metadata.jsonl", "w") as fh:
        for name in names:
            prompt = 'a sign that says "HELLO WORLD"' if name == "good.png" else f"a picture {name}"
            fh.write(json.dumps({"file": name, "prompt": prompt}) + "\n")
    return d


def quiet():
    out = io.StringIO()
    return out, Console(file=out, width=200)


def test_folder_with_every_kind_of_bad_file(mixed, tmp_path):
    err_text, err = quiet()
    _, con = quiet()
    out = tmp_path / "scores"
    report = score_paths(
        [str(mixed)],
        objectives="brightness,ocr",
        out_dir=str(out),
        device="cpu",
        progress=False,
        console=con,
        err_console=err,
    )
    rows = {os.path.basename(r["file"]): r for r in report.rows}
    assert len(rows) == 14
    for name, reason in BAD.items():
        assert reason in rows[name]["error"], (name, rows[name]["error"])
        assert name in err_text.getvalue()
    assert {os.path.basename(f) for f, _ in report.issues} == set(BAD)
    # every good image scored, by hand
    assert rows["good.png"]["ocr"] == 1.0
    assert rows["solid.jpg"]["brightness"] == pytest.approx((0.299 * 51 + 0.587 * 102 + 0.114 * 153) / 255, abs=3e-3)
    assert rows["cmyk.jpg"]["brightness"] == pytest.approx(1.0, abs=3e-3)  # converted through PIL, not read raw
    assert rows["gray16.png"]["brightness"] == pytest.approx(128 / 255, abs=1e-6)  # 16 bits scaled, not clipped
    assert rows["alpha.png"]["brightness"] == pytest.approx(1.0)
    assert rows["palette.png"]["brightness"] == pytest.approx(1.0)
    assert rows["exif.jpg"]["error"] is None and rows["exif.jpg"]["brightness"] > 0
    assert rows["solid.jpg"]["ocr"] is None  # no quoted text: NaN -> null, not an error
    assert rows["nometa.png"]["brightness"] == pytest.approx(1.0) and rows["nometa.png"]["ocr"] is None
    # outputs: jsonl and csv with the same rows, written atomically
    lines = (out / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 14 and all(json.loads(ln)["file"] for ln in lines)
    with open(out / "scores.csv") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["file", "prompt", "brightness", "ocr", "error"]
    assert len(table) == 14
    assert sorted(os.listdir(out)) == ["scores.csv", "scores.jsonl"]  # no temp files left
    assert report.summary["brightness"]["n"] == 8 and report.summary["ocr"]["n"] == 1


def test_strict_and_nothing_scorable(mixed, tmp_path):
    _, con = quiet()
    with pytest.raises(ApexError, match="--strict"):
        score_paths(
            [str(mixed)],
            objectives="brightness",
            out_dir=str(tmp_path / "s"),
            device="cpu",
            strict=True,
            progress=False,
            console=con,
            err_console=con,
        )
    assert (tmp_path / "s" / "scores.jsonl").exists()  # written before failing
    with pytest.raises(ApexError, match="no image could be scored"):
        score_paths(
            [str(mixed / "zero.png"), str(mixed / "text.png")],
            objectives="contrast",
            out_dir=str(tmp_path / "t"),
            device="cpu",
            progress=False,
            console=con,
            err_console=con,
        )


def test_prompt_sources(mixed, tmp_path):
    _, con = quiet()
    one = score_paths(
        [str(mixed / "good.png"), str(mixed / "nometa.png")],
        objectives="ocr",
        prompt='x "HELLO"',
        out_dir=str(tmp_path / "a"),
        device="cpu",
        progress=False,
        console=con,
        err_console=con,
    )
    assert [r["prompt"] for r in one.rows] == ['x "HELLO"'] * 2 and one.issues == []
    assert one.rows[0]["ocr"] == 1.0
    mapping = tmp_path / "prompts.csv"
    mapping.write_text('file,prompt\nmixed/good.png,"a ""HELLO WORLDS"" sign"\n')
    two = score_paths(
        [str(mixed / "good.png")],
        objectives="ocr",
        prompts_file=str(mapping),
        out_dir=str(tmp_path / "b"),
        device="cpu",
        progress=False,
        console=con,
        err_console=con,
    )
    assert two.rows[0]["ocr"] == pytest.approx(1 - 1 / 11)
    glob_report = score_paths(
        [str(mixed / "*.jpg")],
        objectives="brightness",
        out_dir=str(tmp_path / "c"),
        device="cpu",
        progress=False,
        console=con,
        err_console=con,
    )
    assert sorted(os.path.basename(r["file"]) for r in glob_report.rows) == [
        "cmyk.jpg",
        "corrupt.jpg",
        "exif.jpg",
        "solid.jpg",
    ]
    with pytest.raises(ApexError, match="matches no file"):
        score_paths(
            [str(mixed / "nothing-*.png")],
            objectives="brightness",
            device="cpu",
            progress=False,
            console=con,
            err_console=con,
        )


def test_open_image_normalises_orientation_and_modes(mixed):
    assert open_image(str(mixed / "exif.jpg")).size == (20, 40)  # EXIF rotation applied
    for name in ("cmyk.jpg", "gray16.png", "alpha.png", "palette.png"):
        assert open_image(str(mixed / name)).mode == "RGB"


def test_command_parses_and_calls_the_core(mixed, tmp_path):
    app = typer.Typer()
    app.command()(score_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps the command name in argv
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        app,
        [
            "score",
            str(mixed / "good.png"),
            "--objectives",
            "ocr,contrast",
            "--prompt",
            'a sign that says "HELLO WORLD"',
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--set",
            "rewards.ocr.workers=1",
        ],
    )
    assert result.exit_code == 0, result.output
    row = json.loads((out / "scores.jsonl").read_text())
    assert row["ocr"] == 1.0 and row["contrast"] > 0
    bad = runner.invoke(app, ["score", str(mixed), "--objectives", "nosuch", "--device", "cpu"])
    assert isinstance(bad.exception, ApexError) and "valid: adherence, aes, appeal" in str(bad.exception)


def test_folder_lists_dangling_links_loops_subfolders_and_fifos(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (8, 8), "white").save(d / "good.png")
    os.symlink(d / "gone.png", d / "dangling.png")
    os.symlink(d / "loop-b.png", d / "loop-a.png")
    os.symlink(d / "loop-a.png", d / "loop-b.png")
    (d / "sub").mkdir()
    Image.new("RGB", (8, 8), "black").save(d / "sub" / "deep.png")
    os.symlink(d / "sub", d / "linked-dir")
    os.symlink(d / "good.png", d / "alias.png")  # a working link is an image like any other
    os.mkfifo(d / "pipe.png")  # opening it would block forever
    (d / ".hidden.png").write_bytes(b"")
    (d / "metadata.jsonl").write_text("")  # a sidecar: passed over, also when a glob names it
    _, con = quiet()
    err_text, err = quiet()
    report = score_paths(
        [str(d)],
        objectives="brightness",
        out_dir=str(tmp_path / "s"),
        device="cpu",
        progress=False,
        console=con,
        err_console=err,
    )
    reasons = {os.path.basename(f): r for f, r in report.issues}
    assert set(reasons) == {"dangling.png", "loop-a.png", "loop-b.png", "sub", "linked-dir", "pipe.png", ".hidden.png"}
    assert reasons[".hidden.png"].startswith("hidden")
    assert "dangling symlink" in reasons["dangling.png"] and "gone.png" in reasons["dangling.png"]
    assert reasons["loop-a.png"] == reasons["loop-b.png"] == "symlink loop"
    assert "sub-folder" in reasons["sub"] and "sub-folder" in reasons["linked-dir"]
    assert reasons["pipe.png"] == "not a regular file"
    for name in reasons:
        assert name in err_text.getvalue()
    scored = {os.path.basename(r["file"]): r["brightness"] for r in report.rows if r["error"] is None}
    assert scored == {"good.png": 1.0, "alias.png": 1.0}
    assert len(report.rows) == 9  # every entry but the metadata.jsonl sidecar has a row
    # a recursive glob takes the sub-folder in: no longer reported, its image scored; the
    # symlinked folder is not followed (it is listed), so deep.png is scored once
    report = score_paths(
        [str(d / "**")],
        objectives="brightness",
        out_dir=str(tmp_path / "t"),
        device="cpu",
        progress=False,
        console=con,
        err_console=err,
    )
    assert {os.path.basename(f) for f, _ in report.issues} == {
        "dangling.png",
        "loop-a.png",
        "loop-b.png",
        "pipe.png",
        "linked-dir",
    }
    scored = sorted(os.path.basename(r["file"]) for r in report.rows if r["error"] is None)
    assert scored == ["alias.png", "deep.png", "good.png"]


class FakeRewardServer(BaseHTTPRequestHandler):
    """A reward server for one objective whose /score answer is the server's fixed raw text."""

    def do_GET(self):
        self._send(json.dumps({"status": "ok", "objectives": [self.server.objective]}))

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(self.server.answer)

    def _send(self, text):
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fake_reward_server(objective, answer):
    """`objective@URL` served on 127.0.0.1 by FakeRewardServer."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeRewardServer)
    srv.objective, srv.answer = objective, answer
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"{objective}@http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_infinite_scores_are_written_as_null_with_a_note(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(d / f"{i}.png")
    # a misbehaving server: its JSON answer holds the bare words Infinity and -Infinity
    answer = (
        '{"objectives": ["brightness"], "scores": [[Infinity], [-Infinity], [0.25]], '
        '"info": {"brightness": {"raw": [Infinity, NaN, 1.0]}}}'
    )
    _, con = quiet()
    with fake_reward_server("brightness", answer) as objective:
        report = score_paths(
            [str(d)],
            objectives=objective,
            out_dir=str(tmp_path / "s"),
            device="cpu",
            progress=False,
            console=con,
            err_console=con,
        )
    lines = (tmp_path / "s" / "scores.jsonl").read_text().splitlines()
    rows = [json.loads(ln, parse_constant=lambda c: pytest.fail(f"{c} in scores.jsonl")) for ln in lines]
    assert [r["brightness"] for r in rows] == [None, None, 0.25]
    assert "brightness returned inf" in rows[0]["error"] and "brightness returned -inf" in rows[1]["error"]
    assert rows[2]["error"] is None and rows[0]["info"]["brightness"]["raw"] is None
    assert rows[2]["info"]["brightness"]["raw"] == 1.0
    with open(tmp_path / "s" / "scores.csv") as fh:
        assert [r["brightness"] for r in csv.DictReader(fh)] == ["", "", "0.25"]
    assert report.summary["brightness"]["n"] == 1 and len(report.issues) == 2


def test_a_corrupt_metadata_line_costs_only_its_image_prompt(mixed, tmp_path):
    meta = mixed / "metadata.jsonl"
    lines = meta.read_bytes().splitlines()
    lines[1] = b'{"file": "solid.jpg", "prompt": '  # solid.jpg's line, cut short
    lines.insert(3, b"\xff\xfe not utf-8")
    meta.write_bytes(b"\n".join(lines) + b"\n")
    _, con = quiet()
    err_text, err = quiet()
    report = score_paths(
        [str(mixed / "good.png"), str(mixed / "solid.jpg")],
        objectives="brightness",
        out_dir=str(tmp_path / "a"),
        device="cpu",
        progress=False,
        console=con,
        err_console=err,
    )
    assert report.issues == [] and [r["error"] for r in report.rows] == [None, None]
    assert report.rows[0]["prompt"] == 'a sign that says "HELLO WORLD"' and report.rows[1]["prompt"] is None
    assert "metadata.jsonl:2:" in err_text.getvalue() and "metadata.jsonl:4:" in err_text.getvalue()
    # an objective that needs prompts (ocr, served here by a stand-in): only the image whose line is bad lacks one
    with fake_reward_server("ocr", '{"objectives": ["ocr"], "scores": [[0.5], [0.5]], "info": {}}') as ocr:
        report = score_paths(
            [str(mixed / "good.png"), str(mixed / "solid.jpg")],
            objectives=f"{ocr},brightness",
            out_dir=str(tmp_path / "b"),
            device="cpu",
            progress=False,
            console=con,
            err_console=err,
        )
    rows = {os.path.basename(r["file"]): r for r in report.rows}
    assert rows["good.png"]["ocr"] == 0.5 and rows["good.png"]["error"] is None
    assert rows["solid.jpg"]["ocr"] is None
    assert "no prompt" in rows["solid.jpg"]["error"] and rows["solid.jpg"]["brightness"] > 0
    # a --prompts FILE the user names is still checked strictly
    with pytest.raises(ApexError, match="metadata.jsonl:2: expected a JSON object"):
        score_paths(
            [str(mixed / "good.png")],
            objectives="ocr",
            prompts_file=str(meta),
            out_dir=str(tmp_path / "c"),
            device="cpu",
            progress=False,
            console=con,
            err_console=err,
        )


class _SuiteBuilt(Exception):
    """Stops a command right after its reward suite is built."""


def test_every_command_scores_each_objective_in_the_same_dtype(monkeypatch, tmp_path):
    """On a GPU, `apex score`, `apex serve` and training give each objective one dtype: its own
    rewards.X.dtype (deqa float16), else float32 as training scores; the same image then gets the
    same number from every command. CUDA is faked and the models load on the CPU."""
    import torch

    from apexcli.config import resolve_config
    from apexcli.rewards.server import serve_rewards
    from apexcli.rewards.suite import RewardSuite
    from apexcli.train.trainer import Trainer

    clip = save_tiny_clip(str(tmp_path / "pick"))
    aes_clip, head = save_tiny_aes(str(tmp_path / "aes"))
    overrides = [
        f"rewards.pick.source={clip}",
        f"rewards.pick.processor_source={clip}",
        f"rewards.aes.clip_source={aes_clip}",
        f"rewards.aes.head_source={head}",
        f"rewards.deqa.source={save_tiny_deqa(str(tmp_path / 'deqa'))}",
        "rewards.deqa.trust_remote_code=true",
    ]
    objectives = ["pick", "aes", "deqa"]
    cfg = resolve_config(
        preset="tiny", options={"out": str(tmp_path / "run"), "objectives": objectives}, overrides=overrides
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    built: dict[str, dict[str, torch.dtype]] = {}
    build = RewardSuite.__init__

    def on_cpu(name):
        def init(self, objectives, *, device="cpu", dtype=torch.float32, config=None):
            build(self, objectives, device="cpu", dtype=dtype, config=config)
            built[name] = {key: reward.dtype for key, reward in self.rewards.items()}
            self.close()
            raise _SuiteBuilt

        return init

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    for name, command in (
        (
            "score",
            lambda: score_paths(
                [str(tmp_path / "a.png")],
                objectives=objectives,
                prompt="a",
                config=cfg.rewards,
                out_dir=str(tmp_path / "scores"),
                progress=False,
            ),
        ),
        ("serve", lambda: serve_rewards(objectives, port=0, config=cfg.rewards, log=lambda *_: None)),
        ("train", lambda: Trainer(cfg, argv=["test"]).setup()),
    ):
        monkeypatch.setattr(RewardSuite, "__init__", on_cpu(name))
        with pytest.raises(_SuiteBuilt):
            command()
    assert built["train"] == {"pick": torch.float32, "aes": torch.float32, "deqa": torch.float16}
    assert built["score"] == built["train"] and built["serve"] == built["train"]


def _white(path) -> None:
    Image.new("RGB", (8, 8), "white").save(path, format="PNG")


def test_a_file_name_that_is_not_utf8_is_scored_and_written_with_its_bytes_escaped(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _white(d / "ok.png")
    _white(os.fsdecode(os.fsencode(str(d)) + b"/caf\xe9.png"))  # Latin-1 bytes: not UTF-8
    _, con = quiet()
    err_text, err = quiet()
    report = score_paths(
        [str(d)],
        objectives="brightness",
        out_dir=str(tmp_path / "s"),
        device="cpu",
        progress=False,
        console=con,
        err_console=err,
    )
    rows = [json.loads(line) for line in (tmp_path / "s" / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(os.path.basename(r["file"]) for r in rows) == ["caf\\xe9.png", "ok.png"]
    assert [r["brightness"] for r in rows] == [1.0, 1.0] and report.issues == []
    with open(tmp_path / "s" / "scores.csv", encoding="utf-8") as fh:
        assert sorted(os.path.basename(r["file"]) for r in csv.DictReader(fh)) == ["caf\\xe9.png", "ok.png"]


def test_recursive_globs_never_follow_a_symlinked_folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    _white(d / "top.png")
    _white(d / "sub" / "deep.png")
    os.symlink(d, d / "sub" / "up")  # a loop: stdlib glob scored each image once per lap
    os.symlink(d / "sub", d / "sub" / "again")  # a second loop: stdlib glob never finished
    _, con = quiet()
    report = score_paths(
        [str(d / "**" / "*.png")],
        objectives="brightness",
        out_dir=str(tmp_path / "s"),
        device="cpu",
        progress=False,
        console=con,
        err_console=con,
    )
    scored = sorted(os.path.relpath(r["file"], d) for r in report.rows if r["error"] is None)
    assert scored == ["sub/deep.png", "top.png"]
    reasons = {os.path.relpath(f, d): r for f, r in report.issues}
    assert set(reasons) == {"sub/up", "sub/again"}
    assert all(r.startswith("symlink to a folder, not followed") for r in reasons.values())


def test_control_characters_in_file_names_never_reach_the_terminal(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _white(d / "ok.png")
    (d / "title\x1b]0;pwned\x07-csi\x9b2J.png").write_bytes(b"")  # an empty file: reported by name
    _, con = quiet()
    err_text, err = quiet()
    score_paths(
        [str(d)],
        objectives="brightness",
        out_dir=str(tmp_path / "s"),
        device="cpu",
        progress=False,
        console=con,
        err_console=err,
    )
    printed = err_text.getvalue()
    assert "\x1b" not in printed and "\x9b" not in printed and "\x07" not in printed
    assert "title\\x1b]0;pwned\\x07-csi\\x9b2J.png: empty file" in printed


def test_hidden_files_and_other_extensions_are_listed_as_skipped(tmp_path):
    """Only the files apex writes beside images (metadata.jsonl, scores.jsonl/csv) are passed
    over in silence: a folder of `apex sample` output scored in place reports nothing odd."""
    d = tmp_path / "imgs"
    d.mkdir()
    _white(d / "ok.png")
    _white(d / "x.png.txt")
    _white(d / ".hidden.png")
    (d / "metadata.jsonl").write_text(json.dumps({"file": "ok.png", "prompt": "white"}) + "\n")
    (d / "scores.csv").write_text("file\n")
    _, con = quiet()
    err_text, err = quiet()
    report = score_paths(
        [str(d)],
        objectives="brightness",
        out_dir=str(tmp_path / "s"),
        device="cpu",
        progress=False,
        console=con,
        err_console=err,
    )
    reasons = {os.path.basename(f): r for f, r in report.issues}
    assert reasons == {
        ".hidden.png": "hidden (its name starts with '.'); name the file to score it",
        "x.png.txt": "not an image file (extension .txt)",
    }
    assert "x.png.txt" in err_text.getvalue() and ".hidden.png" in err_text.getvalue()
    assert {os.path.basename(r["file"]): r["error"] for r in report.rows} == {"ok.png": None, **reasons}


def test_decoded_pixels_per_batch_are_bounded_from_the_headers(tmp_path, monkeypatch):
    import apexcli.scoring as scoring

    d = tmp_path / "imgs"
    d.mkdir()
    for name, side in (("a.png", 20), ("b.png", 20), ("big.png", 40), ("c.png", 20)):
        Image.new("RGB", (side, side), "white").save(d / name)
    files = [str(d / n) for n in ("a.png", "b.png", "big.png", "c.png")]
    batches, too_large = scoring.plan_batches(files, batch_size=32, max_batch_pixels=1000)
    assert batches == [files[:2], files[3:]]  # 400 + 400 pixels, then 400: never more than 1000
    assert too_large == [
        (
            files[2],
            "too large for one scoring batch: 40x40 = 1600 pixels > --max-batch-pixels 1000; "
            "raise it to score this image",
        )
    ]
    decoded = []
    real_open = scoring.open_image
    monkeypatch.setattr(scoring, "open_image", lambda path, limit: decoded.append(path) or real_open(path, limit))
    _, con = quiet()
    report = score_paths(
        files,
        objectives="brightness",
        out_dir=str(tmp_path / "s"),
        device="cpu",
        max_batch_pixels=1000,
        progress=False,
        console=con,
        err_console=con,
    )
    assert files[2] not in decoded and sorted(decoded) == sorted(files[:2] + files[3:])
    assert [os.path.basename(f) for f, _ in report.issues] == ["big.png"]
    with pytest.raises(ApexError, match="--max-batch-pixels must be at least 1"):
        score_paths(
            files,
            objectives="brightness",
            out_dir=str(tmp_path / "t"),
            device="cpu",
            max_batch_pixels=0,
            progress=False,
            console=con,
            err_console=con,
        )


def test_existing_scores_are_kept_unless_overwrite(mixed, tmp_path):
    _, con = quiet()
    out = tmp_path / "s"
    score_paths(
        [str(mixed / "good.png")],
        objectives="brightness",
        out_dir=str(out),
        device="cpu",
        progress=False,
        console=con,
        err_console=con,
    )
    first = (out / "scores.jsonl").read_text()
    with pytest.raises(ApexError, match="scores.jsonl' exists .*pass --overwrite"):
        score_paths(
            [str(mixed / "solid.jpg")],
            objectives="brightness",
            out_dir=str(out),
            device="cpu",
            progress=False,
            console=con,
            err_console=con,
        )
    assert (out / "scores.jsonl").read_text() == first
    score_paths(
        [str(mixed / "solid.jpg")],
        objectives="brightness",
        out_dir=str(out),
        device="cpu",
        overwrite=True,
        progress=False,
        console=con,
        err_console=con,
    )
    assert "solid.jpg" in (out / "scores.jsonl").read_text()


def test_out_under_the_home_folder_is_expanded(mixed, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command()(score_command)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(
        app,
        [
            "score",
            str(mixed / "good.png"),
            "--objectives",
            "brightness",
            "--out=~/scored",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (home / "scored" / "scores.jsonl").is_file() and not (tmp_path / "~").exists()


def test_an_existing_name_with_glob_characters_is_that_file(tmp_path):
    _white(tmp_path / "shot[1].png")
    _, con = quiet()
    report = score_paths(
        [str(tmp_path / "shot[1].png")],
        objectives="brightness",
        out_dir=str(tmp_path / "s"),
        device="cpu",
        progress=False,
        console=con,
        err_console=con,
    )
    assert [os.path.basename(r["file"]) for r in report.rows] == ["shot[1].png"] and report.issues == []
