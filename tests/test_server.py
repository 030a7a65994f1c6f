"""Reward server: round trip equals in-process scoring; a down server is a clear error."""

import json
import socket
import threading
import urllib.request

import pytest
import torch

from apexcli.errors import ApexError
from apexcli.rewards import RemoteConfig, RewardsConfig, RewardSuite
from apexcli.rewards.remote import RemoteReward
from apexcli.rewards.server import make_server
from reward_models import save_tiny_clip

FAST = RemoteConfig(timeout_s=30, retries=1, backoff_s=0.01)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    cfg = RewardsConfig(remote=FAST)
    cfg.pick.source = cfg.pick.processor_source = save_tiny_clip(str(tmp_path_factory.mktemp("pick")))
    return cfg


@pytest.fixture(scope="module")
def server(config):
    suite = RewardSuite(["pick", "brightness", "ocr"], config=config)
    srv = make_server(suite, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    suite.close()


def images_8bit(n=5, seed=0):
    # exact 8-bit levels: PNG transport is then lossless
    return (torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_round_trip_equals_in_process(server, config):
    x = images_8bit()
    prompts = ["a cat", "a dog", 'a "sign"', "sky", "a cat"]
    url = server.url
    with RewardSuite(["brightness", "pick"], config=config) as local, \
            RewardSuite([f"pick@{url}", "contrast", f"brightness@{url}", f"ocr@{url}"], config=config) as remote:
        R_local, _ = local(x, prompts)
        R_remote, info = remote(x, prompts)
    torch.testing.assert_close(R_remote[:, 0], R_local[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(R_remote[:, 2], R_local[:, 0], atol=1e-6, rtol=1e-6)
    assert torch.isnan(R_remote[[0, 1, 3, 4], 3]).all() and R_remote[2, 3].item() == 0.0  # NaN travels as null
    assert info["ocr"]["target"][2] == "sign"


def test_url_from_config_section(server, config):
    cfg = RewardsConfig(remote=FAST)
    cfg.pick.url = server.url
    with RewardSuite(["pick"], config=cfg) as suite:
        assert isinstance(suite.rewards["pick"], RemoteReward)


def test_server_down_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ApexError) as err:
        RewardSuite([f"deqa@{url}"], config=RewardsConfig(remote=FAST))
    msg = str(err.value)
    assert url in msg and "apex serve --objectives deqa" in msg and "2 attempt" in msg and "\n" not in msg


def test_server_dying_mid_run_is_an_error_not_zeros(config):
    suite = RewardSuite(["brightness"], config=config)
    srv = make_server(suite, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    client = RewardSuite([f"brightness@{srv.url}"], config=config)
    assert client(images_8bit(2), None)[0].shape == (2, 1)
    srv.shutdown()
    srv.server_close()
    with pytest.raises(ApexError, match="failed for brightness"):
        client(images_8bit(2), None)
    client.close()
    suite.close()


def test_objective_not_served_and_bad_requests(server):
    with pytest.raises(ApexError, match="not aes"):
        RemoteReward("aes", server.url, FAST)
    req = urllib.request.Request(server.url + "/score", data=json.dumps({"images": ["!!"], "prompts": ["x"]}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400 and "image 0" in json.loads(err.value.read())["error"]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
        assert json.loads(resp.read())["objectives"] == ["pick", "brightness", "ocr"]


def test_bad_url_is_refused():
    with pytest.raises(ApexError, match="must start with http://"):
        RewardSuite(["pick@127.0.0.1:18086"])
