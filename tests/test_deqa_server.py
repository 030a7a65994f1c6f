"""DeQA reward server: a stand-in with DeQA-Score's score() (square padding, half casts, level
expectation) loaded as remote code, served on loopback and scored through our remote client."""

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apexcli.errors import ApexError
from apexcli.rewards.config import RemoteConfig
from apexcli.rewards.deqa_server import build_suite, jpeg_round_trip, main
from apexcli.rewards.remote import RemoteReward
from apexcli.rewards.server import make_server

ROOT = Path(__file__).resolve().parents[1]
FAST = RemoteConfig(timeout_s=30, retries=0, backoff_s=0.01)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
THUMB = 4

CONFIG_PY = """
from transformers import PretrainedConfig


class HalfDeqaConfig(PretrainedConfig):
    model_type = "half_deqa"
"""

# The structure of DeQA-Score's score(): pad to a square with the processor's mean colour,
# pre-process, cast the pixels to half on the model's device, take the logits of the five
# level words, and return softmax @ half([5, 4, 3, 2, 1]). A float32 or bfloat16 load fails in
# the head as the real model does ("Input type (c10::Half) and bias type ...").
MODELING_PY = f"""
import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel

from .configuration_half_deqa import HalfDeqaConfig

MEAN = {CLIP_MEAN}
STD = {CLIP_STD}
THUMB = {THUMB}


def expand2square(img, background):
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


class HalfDeqaModel(PreTrainedModel):
    config_class = HalfDeqaConfig

    def __init__(self, config):
        super().__init__(config)
        self.head = torch.nn.Linear(3 * THUMB * THUMB, 5)

    def _init_weights(self, module):
        pass

    def preprocess(self, images):
        arrays = []
        for im in images:
            im = im.convert("RGB").resize((THUMB, THUMB), Image.BICUBIC)
            x = (np.asarray(im, dtype=np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
            arrays.append(x.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))

    def score(self, images, task_="quality", input_="image"):
        weight_tensor = torch.Tensor([5., 4., 3., 2., 1.]).half().to(self.device)
        background = tuple(int(x * 255) for x in MEAN)
        images = [expand2square(img, background) for img in images]
        with torch.inference_mode():
            pixels = self.preprocess(images).half().to(self.device)
            logits = self.head(pixels.flatten(1))
            return torch.softmax(logits, -1) @ weight_tensor
"""


@pytest.fixture(scope="module")
def deqa_dir(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("half_deqa")
    (path / "configuration_half_deqa.py").write_text(textwrap.dedent(CONFIG_PY))
    (path / "modeling_half_deqa.py").write_text(MODELING_PY)
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "half_deqa",
                "architectures": ["HalfDeqaModel"],
                "torch_dtype": "float16",
                "auto_map": {
                    "AutoConfig": "configuration_half_deqa.HalfDeqaConfig",
                    "AutoModelForCausalLM": "modeling_half_deqa.HalfDeqaModel",
                },
            }
        )
    )
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "head.weight": torch.randn(5, 3 * THUMB * THUMB, generator=g) * 0.8,
            "head.bias": torch.randn(5, generator=g) * 0.3,
        },
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )  # transformers 4.36 requires it (real checkpoints have it)
    return str(path)


def expected(deqa_dir, images):
    """The stand-in's score in float64, by hand."""
    from safetensors.torch import load_file

    w = load_file(os.path.join(deqa_dir, "model.safetensors"))
    W, b = w["head.weight"].double().numpy(), w["head.bias"].double().numpy()
    bg = tuple(int(x * 255) for x in CLIP_MEAN)
    out = []
    for im in images:
        side = max(im.size)
        square = Image.new("RGB", (side, side), bg)
        square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        x = np.asarray(square.resize((THUMB, THUMB), Image.BICUBIC), dtype=np.float64) / 255.0
        x = ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).reshape(-1)
        logits = W @ x + b
        p = np.exp(logits - logits.max())
        out.append(float(p @ [5, 4, 3, 2, 1] / p.sum()))
    return torch.tensor(out)


def photos(n=4):
    g = np.random.default_rng(0)
    sizes = [(40, 24), (24, 40), (32, 32), (48, 30)]
    return [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def serve(suite):
    server = make_server(suite, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server, suite):
    server.shutdown()
    server.server_close()
    suite.close()


def test_float16_default_scores_through_the_remote_client(deqa_dir):
    suite = build_suite(deqa_dir, device="cpu", trust_remote_code=True, batch_size=3)
    assert suite.reward.model.head.weight.dtype == torch.float16
    server = serve(suite)
    try:
        images = photos()
        scores, _ = RemoteReward("deqa", server.url, FAST)(images)
        torch.testing.assert_close(scores, expected(deqa_dir, images).float(), atol=2e-2, rtol=0)
        assert ((scores > 1) & (scores < 5)).all()
    finally:
        stop(server, suite)


def test_float32_load_fails_inside_score_as_deqa_does(deqa_dir):
    # why float16 is the default: the half casts inside score() meet float32 weights
    suite = build_suite(deqa_dir, device="cpu", dtype="float32", trust_remote_code=True)
    server = serve(suite)
    try:
        with pytest.raises(ApexError, match=r"HTTP 500: RuntimeError: .*dtype"):
            RemoteReward("deqa", server.url, FAST)(photos(2))
    finally:
        stop(server, suite)


def test_flow_grpo_transport_and_scale(deqa_dir):
    images = photos()
    sent = [jpeg_round_trip(im, 75) for im in images]
    png, jpeg = expected(deqa_dir, images), expected(deqa_dir, sent)
    assert (png - jpeg).abs().max() > 0.04  # the JPEG round trip changes what the model sees
    suite = build_suite(deqa_dir, device="cpu", trust_remote_code=True, jpeg_quality=75, scale=0.2)
    server = serve(suite)
    try:
        scores, _ = RemoteReward("deqa", server.url, FAST)(images)
        torch.testing.assert_close(scores, 0.2 * jpeg.float(), atol=4e-3, rtol=0)
    finally:
        stop(server, suite)


def test_refusals(deqa_dir, capsys):
    with pytest.raises(ApexError, match="--trust-remote-code"):
        build_suite(deqa_dir, device="cpu")
    assert main(["--source", deqa_dir, "--device", "cpu", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--trust-remote-code" in err
    missing = os.path.join(deqa_dir, "no-such-model")
    assert main(["--trust-remote-code", "--source", missing, "--device", "cpu", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "pass --source DIR" in err and err.count("\n") == 1
    with pytest.raises(ApexError, match="--jpeg-quality 101"):
        build_suite(deqa_dir, device="cpu", trust_remote_code=True, jpeg_quality=101)


def test_imports_only_what_the_deqa_environment_installs():
    """Beyond torch, numpy, PIL and transformers, the server may import only apexcli and the
    packages of requirements-deqa.txt: apexcli is installed there without its dependencies."""
    requirements = (ROOT / "requirements-deqa.txt").read_text()
    assert re.search(r"^transformers==4\.36\.1$", requirements, re.M)
    probe = textwrap.dedent("""
        import sys, json, types
        import numpy, torch, PIL.Image
        # a stand-in transformers: what it imports is its own business, and skipping it is fast
        sys.modules["transformers"] = types.SimpleNamespace(__version__="4.36.1", AutoModelForCausalLM=None)
        before = set(sys.modules)
        import apexcli.rewards.deqa_server, apexcli.rewards.server, apexcli.rewards.deqa
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        files = [m for m in new if getattr(sys.modules.get(m), "__file__", None)]  # not Cython's runtime
        print(json.dumps(sorted(m for m in files if m not in sys.stdlib_module_names and not m.startswith("_"))))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    imported = set(json.loads(out.stdout.strip().splitlines()[-1]))
    import_names = {"pyyaml": "yaml", "pillow": "PIL"}
    installed = {import_names.get(n, n) for n in re.findall(r"^([A-Za-z0-9_.-]+)", requirements, re.M)}
    assert "apexcli" in imported and imported - {"apexcli"} <= installed, imported


def test_make_target_builds_its_own_venv():
    out = subprocess.run(
        ["make", "-n", "-B", "deqa-server"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "-m venv .venv-deqa" in out
    assert "-r requirements-deqa.txt" in out and "--no-deps -e ." in out


def test_token_from_flag_or_the_clients_variable(monkeypatch):
    from apexcli.rewards.deqa_server import parse_args

    monkeypatch.delenv("APEX_SERVE_TOKEN", raising=False)
    assert parse_args([]).token == ""
    monkeypatch.setenv("APEX_SERVE_TOKEN", "s3cret")  # the variable the remote client sends
    assert parse_args([]).token == "s3cret"
    assert parse_args(["--token", "other"]).token == "other"
