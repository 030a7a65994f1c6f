"""apex doctor: one row per check, exit 1 on any FAIL with the fix; apex train stops at the same
checks before any model loads. Everything here is offline and takes well under a second per check."""

import socket
import threading

import pytest
import torch

from apexcli import doctor
from apexcli.doctor import FAIL, OK, Row, diagnose
from apexcli.rewards import RewardSuite
from apexcli.rewards.server import make_server
from helpers import TINY_OVERRIDES, run_cli

TINY_ROWS = [
    "python",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "device",
    "model",
    "reward brightness",
    "reward colorfulness",
    "disk",
]


def row(rows: list[Row], name: str) -> Row:
    matches = [r for r in rows if r.name == name]
    assert len(matches) == 1, [r.name for r in rows]
    return matches[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own (the env for anything that reads it later,
    huggingface_hub's constant for what read it at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_file(cache, repo_id: str, filename: str) -> None:
    """What huggingface_hub leaves after downloading one file of `repo_id` at main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_text("{}")


@pytest.mark.parametrize("preset", ["tiny", "mini"])
def test_shipped_cpu_presets_pass_and_every_row_is_shown(preset, tmp_path):
    result = run_cli(["doctor", "--preset", preset, "--out", str(tmp_path / "run")])
    assert result.code == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    rows = diagnose(preset=preset, options={"out": str(tmp_path / "run")})
    names = TINY_ROWS if preset == "tiny" else [r.name for r in rows]
    for name in names:
        assert name in result.stdout
    assert all(r.status == OK for r in rows if r.name != "disk"), rows
    assert not (tmp_path / "run").exists()  # the doctor creates nothing


def test_hub_model_not_in_cache_fails_with_the_download_command(hub_cache):
    result = run_cli(["doctor", "--preset", "tiny", "--model", "someorg/not-cached"])
    assert result.code == 1
    model = row(diagnose(preset="tiny", options={"model": {"pretrained": "someorg/not-cached"}}), "model")
    assert model.status == FAIL and str(hub_cache) in model.found
    assert model.fix == "huggingface-cli download someorg/not-cached --local-dir DIR, then model.pretrained=DIR"


def test_hub_model_in_cache_is_found_without_download(hub_cache):
    cache_file(hub_cache, "someorg/cached", "model_index.json")
    model = row(diagnose(preset="tiny", options={"model": {"pretrained": "someorg/cached"}}), "model")
    assert model.status == OK and "hub cache" in model.found


def test_hub_answering_makes_a_missing_model_a_warning_not_a_failure(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(doctor, "hub_offline", lambda: False)
    monkeypatch.setattr(doctor, "hub_refusal", lambda repo_id, revision: None)
    model = row(diagnose(preset="tiny", options={"model": {"pretrained": "someorg/online"}}), "model")
    assert model.status == "warn" and "downloads" in model.found
    assert run_cli(["doctor", "--preset", "tiny", "--model", "someorg/online"]).code == 0


def test_local_model_dir_needs_model_index(tmp_path):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    model = row(diagnose(preset="tiny", options={"model": {"pretrained": str(folder)}}), "model")
    assert model.status == FAIL and "model_index.json" in model.found and model.fix.startswith("model.pretrained=")
    (folder / "model_index.json").write_text("{}")
    assert row(diagnose(preset="tiny", options={"model": {"pretrained": str(folder)}}), "model").status == OK


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only verdict")
def test_cuda_asked_on_a_cpu_machine_fails_with_the_fix():
    result = run_cli(["doctor", "--preset", "tiny", "--set", "model.device=cuda"])
    assert result.code == 1
    device = row(diagnose(preset="tiny", overrides=["model.device=cuda"]), "device")
    assert device.status == FAIL and "CPU" in device.found and device.fix == "model.device=cpu"


def test_missing_local_reward_weights_name_the_option(tmp_path):
    missing = str(tmp_path / "no-pick")
    rows = diagnose(preset="tiny", options={"objectives": ["pick"]}, overrides=[f"rewards.pick.source={missing}"])
    pick = row(rows, "reward pick")
    assert pick.status == FAIL and "rewards.pick.source" in pick.found and pick.fix.startswith("rewards.pick.source=")
    result = run_cli(["doctor", "--preset", "tiny", "--objectives", "pick", "--set", f"rewards.pick.source={missing}"])
    assert result.code == 1


def test_local_reward_weights_are_found(tmp_path):
    from reward_models import save_tiny_clip

    clip = save_tiny_clip(str(tmp_path / "pick"))
    rows = diagnose(
        preset="tiny",
        options={"objectives": ["pick"]},
        overrides=[f"rewards.pick.source={clip}", f"rewards.pick.processor_source={clip}"],
    )
    assert row(rows, "reward pick").status == OK


def test_remote_reward_at_a_closed_port_fails_with_how_to_start_it():
    port = closed_port()
    rows = diagnose(preset="tiny", options={"objectives": ["brightness", f"contrast@http://127.0.0.1:{port}"]})
    remote = row(rows, "reward contrast")
    assert remote.status == FAIL and str(port) in remote.found
    assert remote.fix == f"apex serve --objectives contrast --port {port}"
    assert row(rows, "reward brightness").status == OK


def test_remote_reward_answering_is_ok():
    suite = RewardSuite(["contrast"])
    srv = make_server(suite, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        rows = diagnose(preset="tiny", options={"objectives": [f"contrast@{srv.url}"]})
        served = diagnose(preset="tiny", options={"objectives": [f"brightness@{srv.url}"]})
    finally:
        srv.shutdown()
        srv.server_close()
        suite.close()
    assert row(rows, "reward contrast").status == OK
    assert row(served, "reward brightness").status == FAIL  # that server scores contrast only


def test_unknown_objective_fails_and_keeps_the_known_ones():
    rows = diagnose(preset="tiny", options={"objectives": ["brightness", "nosuch"]})
    unknown = row(rows, "reward nosuch")
    assert unknown.status == FAIL and "'nosuch'" in unknown.found and unknown.fix == "--objectives brightness"


@pytest.mark.parametrize("version", ["0.1.0", None])
def test_package_outside_the_declared_range_fails(version, monkeypatch):
    real = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda name: version if name == "peft" else real(name))
    peft = row(diagnose(preset="tiny"), "peft")
    assert peft.status == FAIL and peft.fix == "pip install 'peft>=0.13'"  # the range of pyproject.toml
    assert row(diagnose(preset="tiny"), "diffusers").status == OK
    assert run_cli(["doctor", "--preset", "tiny"]).code == 1


def test_disk_under_the_floor_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "DISK_FLOOR_BYTES", 2**62)
    monkeypatch.setattr(doctor, "DISK_WARN_BYTES", 2**63)
    disk = row(diagnose(preset="tiny", options={"out": str(tmp_path / "a" / "b")}), "disk")
    assert disk.status == FAIL and str(tmp_path) in disk.found and disk.fix.startswith("--out DIR")


def test_train_stops_at_the_first_failing_check_before_any_model_loads(tmp_path, monkeypatch):
    import apexcli.train.setup as setup

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded despite a failing check")

    monkeypatch.setattr(setup, "load_pipeline", no_load)
    out = tmp_path / "run"
    port = closed_port()
    result = run_cli(
        [
            "train",
            "--preset",
            "tiny",
            "--out",
            str(out),
            *TINY_OVERRIDES,
            "--objectives",
            f"brightness,contrast@http://127.0.0.1:{port}",
        ]
    )
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: reward contrast: "), result.stderr
    assert lines[0].endswith(f"fix: apex serve --objectives contrast --port {port}")
    assert not out.exists()


def test_objectives_only_evaluated_are_checked_too():
    port = closed_port()
    evaluated = f"contrast@http://127.0.0.1:{port}"
    rows = diagnose(preset="tiny", overrides=[f"eval.objectives=[brightness, {evaluated}]"])
    assert row(rows, f"eval reward {evaluated}").status == FAIL
    off = diagnose(preset="tiny", overrides=[f"eval.objectives=[{evaluated}]", "eval.every=0"])
    assert all(r.status == OK for r in off if r.name != "disk")


@pytest.mark.parametrize("major,bf16", [(9, OK), (7, "warn")])
def test_gpu_rows_name_the_card_its_memory_and_bf16(major, bf16, monkeypatch):
    from types import SimpleNamespace

    from apexcli.config import resolve_config

    card = SimpleNamespace(name="Test GPU", total_memory=80 * 2**30, major=major, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: card)
    rows = doctor.device_rows(resolve_config(preset="tiny", overrides=["model.device=auto", "model.dtype=bfloat16"]))
    assert rows[0] == Row("device", OK, f"cuda:0 Test GPU, 80.0 GiB, sm_{major}0")
    assert rows[1].name == "bf16" and rows[1].status == bf16
    absent = doctor.device_rows(resolve_config(preset="tiny", overrides=["model.device=cuda:1"]))
    assert absent == [
        Row("device", FAIL, "model.device=cuda:1 but only 1 CUDA GPU(s) are visible", "model.device=cuda:0")
    ]


def test_the_memory_row_compares_the_plan_with_the_machine(monkeypatch):
    from apexcli import doctor
    from apexcli.config import resolve_config

    cfg = resolve_config(preset="mini", overrides=["model.device=cpu"])
    monkeypatch.setattr(doctor, "_host_ram_bytes", lambda: 64 * 2**30)
    (row,) = doctor.memory_rows(cfg)
    assert row.status == doctor.OK and "training peak" in row.found and "this host's RAM has 68.7 GB" in row.found
    monkeypatch.setattr(doctor, "_host_ram_bytes", lambda: 2**20)  # 1 MiB: nothing fits
    (row,) = doctor.memory_rows(cfg)
    assert row.status == doctor.FAIL and row.fix.startswith(
        ("model.gradient_checkpointing=true", "train.train_batch_size=")
    )
    # apex train on a CPU does not spend the plan's seconds: only a GPU run is stopped by it
    assert doctor.gpu_memory_rows(cfg) == []


@pytest.fixture(scope="module")
def flux_1gpu_plan():
    """flux1-dev-1gpu's plan, computed once (building the 12 B transformer on meta takes seconds);
    the rows below differ only in the machine and where DeQA runs, which the plan does not read."""
    from apexcli.config import resolve_config
    from apexcli.models.memory_plan import plan_memory

    return plan_memory(resolve_config(preset="flux1-dev-1gpu"))


def test_a_gpu_preset_on_a_host_without_a_gpu_is_judged_on_its_loading_only(monkeypatch, flux_1gpu_plan):
    """No GPU verdict without a GPU (the device row fails already); the host RAM the weights load
    through is still checked, and its fix names the RAM needed."""
    from apexcli import doctor
    from apexcli.config import resolve_config

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("apexcli.models.memory_plan.plan_memory", lambda *a, **k: flux_1gpu_plan)
    cfg = resolve_config(preset="flux1-dev-1gpu")
    monkeypatch.setattr(doctor, "_host_ram_bytes", lambda: 64 * 10**9)
    (row,) = doctor.memory_rows(cfg)
    assert row.status == doctor.OK and "no GPU here" in row.found and "training peak 51.8 GB" in row.found
    monkeypatch.setattr(doctor, "_host_ram_bytes", lambda: 25 * 10**9)
    (row,) = doctor.memory_rows(cfg)
    assert row.status == doctor.WARN and row.fix.startswith("a host with at least 34 GB of RAM")


def test_the_memory_fix_moves_deqa_off_the_gpu_first(monkeypatch, flux_1gpu_plan):
    """On a 56 GB GPU flux1-dev-1gpu fits only without DeQA beside it (51.8 GB training and 59.0 GB
    encoding with it, 35.4 and 42.6 without): the fix is DeQA behind its server, not a smaller batch."""
    from types import SimpleNamespace

    import torch

    from apexcli import doctor
    from apexcli.config import resolve_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=56 * 10**9))
    monkeypatch.setattr(doctor, "_host_ram_bytes", lambda: 256 * 10**9)
    monkeypatch.setattr("apexcli.models.memory_plan.plan_memory", lambda *a, **k: flux_1gpu_plan)
    cfg = resolve_config(preset="flux1-dev-1gpu", options={"objectives": ["pick", "deqa", "aes", "ocr"]})
    (row,) = doctor.memory_rows(cfg)
    assert row.status == doctor.FAIL and row.fix.startswith("run DeQA behind its own server")
    cfg = resolve_config(
        preset="flux1-dev-1gpu", options={"objectives": ["pick", "deqa@http://127.0.0.1:18086", "aes", "ocr"]}
    )
    (row,) = doctor.memory_rows(cfg)
    assert row.status == doctor.OK and "this GPU has 56.0 GB" in row.found
