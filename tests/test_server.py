"""Reward server: round trip equals in-process scoring; a down server is a clear error; bursts,
malformed requests, stalled clients and missing tokens get the documented answers.
Servers bind 127.0.0.1 only; every wait has a generous timeout as a hang guard."""

import base64
import contextlib
import json
import math
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from apexcli.errors import ApexError
from apexcli.rewards import RemoteConfig, RewardsConfig, RewardSuite
from apexcli.rewards.config import apply_overrides
from apexcli.rewards.remote import TOKEN_ENV, RemoteReward, encode_png, request_json
from apexcli.rewards.server import make_server
from helpers import HANG_GUARD_S
from reward_models import save_tiny_clip

FAST = RemoteConfig(timeout_s=HANG_GUARD_S, retries=1, backoff_s=0.01)


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
    with (
        RewardSuite(["brightness", "pick"], config=config) as local,
        RewardSuite([f"pick@{url}", "contrast", f"brightness@{url}", f"ocr@{url}"], config=config) as remote,
    ):
        R_local, _ = local(x, prompts)
        R_remote, info = remote(x, prompts)
    torch.testing.assert_close(R_remote[:, 0], R_local[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(R_remote[:, 2], R_local[:, 0], atol=1e-6, rtol=1e-6)
    assert torch.isnan(R_remote[[0, 1, 3, 4], 3]).all() and R_remote[2, 3].item() == 0.0  # NaN travels as null
    assert info["ocr"]["target"][2] == "sign"


def test_a_server_is_named_in_the_objective_only(server):
    with pytest.raises(
        ApexError, match=r"config key 'rewards.pick.url' was removed: serve the reward from a server with pick@URL"
    ):
        apply_overrides(RewardsConfig(), [f"rewards.pick.url={server.url}"])
    with pytest.raises(ApexError, match=r"'rewards.extra.redness.url' was removed"):
        apply_overrides(RewardsConfig(), [f"extra.redness.url={server.url}"])
    with RewardSuite([f"pick@{server.url}"], config=RewardsConfig(remote=FAST)) as suite:
        assert isinstance(suite.rewards["pick"], RemoteReward)


def test_server_down_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ApexError) as err:
        RewardSuite([f"deqa@{url}"], config=RewardsConfig(remote=FAST))
    msg = str(err.value)
    assert url in msg and "apexcli.rewards.deqa_server" in msg and "2 attempt" in msg and "\n" not in msg


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
    req = urllib.request.Request(
        server.url + "/score",
        data=json.dumps({"images": ["!!"], "prompts": ["x"]}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=HANG_GUARD_S)
    assert err.value.code == 400 and "image 0" in json.loads(err.value.read())["error"]
    with urllib.request.urlopen(server.url + "/health", timeout=HANG_GUARD_S) as resp:
        assert json.loads(resp.read())["objectives"] == ["pick", "brightness", "ocr"]


def test_bad_url_is_refused():
    with pytest.raises(ApexError, match="must start with http://"):
        RewardSuite(["pick@127.0.0.1:18086"])


# --- limits: bursts, malformed requests, stalled clients, bounded threads, token ----------------


@pytest.fixture
def start_server():
    """start_server(**make_server options) -> a running brightness server on 127.0.0.1."""
    started = []

    def start(host="127.0.0.1", **options):
        suite = RewardSuite(["brightness"])
        try:
            srv = make_server(suite, host, 0, **options)
        except BaseException:
            suite.close()
            raise
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append((srv, suite))
        return srv

    yield start
    for srv, suite in started:
        srv.shutdown()
        srv.server_close()
        suite.close()


@pytest.fixture
def bright_server(start_server):
    return start_server()


def png_b64(level=128):
    return encode_png(Image.new("RGB", (16, 16), (level, level, level)))


def post(url, body: bytes, headers=None, timeout=HANG_GUARD_S):
    """(status, decoded JSON answer) of one POST, errors included."""
    req = urllib.request.Request(url + "/score", data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def valid_body(n=1):
    return json.dumps({"objectives": ["brightness"], "prompts": ["x"] * n, "images": [png_b64()] * n}).encode()


def test_burst_of_50_concurrent_requests_all_answered(bright_server):
    # the stdlib's listen backlog of 5 reset 3-21 of these per burst
    barrier = threading.Barrier(50)

    def one(_):
        barrier.wait(timeout=HANG_GUARD_S)  # all connect at once
        return post(bright_server.url, valid_body())

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    assert [code for code, _ in answers] == [200] * 50
    assert all(a["scores"] == [[pytest.approx(128 / 255, abs=1e-6)]] for _, a in answers)


@pytest.mark.parametrize(
    "body,match",
    [
        (b"[]", "JSON object"),
        (b"null", "JSON object"),
        (b'"text"', "JSON object"),
        (b'{"objectives": 3, "images": [], "prompts": []}', "list of names"),
        (b'{"objectives": [["brightness"]], "images": [], "prompts": []}', "list of names"),
        (b'{"images": [3], "prompts": ["x"]}', "image 0"),
        (b'{"images": ["' + b"A" * 8 + b'"], "prompts": [7]}', "list of strings"),
        (b'{"images": {}, "prompts": []}', "same length"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_malformed_requests_answer_400(bright_server, body, match):
    code, answer = post(bright_server.url, body)
    assert code == 400 and match in answer["error"]


def test_bad_content_length_is_400(bright_server):
    host, port = bright_server.server_address[:2]
    with socket.create_connection((host, port), timeout=HANG_GUARD_S) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 400")


class CountingHandler(BaseHTTPRequestHandler):
    """Answers every request with the server's fixed status and counts the requests."""

    def do_POST(self):
        self.server.hits += 1
        data = json.dumps({"error": "no"}).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,attempts", [(400, 1), (401, 1), (404, 1), (413, 1), (500, 3), (503, 3)])
def test_client_retries_5xx_only(status, attempts):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    srv.status, srv.hits = status, 0
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with pytest.raises(ApexError, match=f"HTTP {status}"):
            request_json(
                f"http://127.0.0.1:{srv.server_address[1]}/score",
                {"x": 1},
                RemoteConfig(timeout_s=HANG_GUARD_S, retries=2, backoff_s=0.01),
                "brightness",
            )
        assert srv.hits == attempts
    finally:
        srv.shutdown()
        srv.server_close()


def handler_threads():
    """Live request threads of every server in this process (the earlier tests' are all done)."""
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1000) == b""  # the server sends nothing to a client that stalled
    except ConnectionResetError:
        return True


def test_stalled_clients_are_dropped_and_threads_stay_bounded(start_server):
    bright_server = start_server(threads=3, timeout_s=0.5)
    host, port = bright_server.server_address[:2]
    stalled = [socket.create_connection((host, port), timeout=HANG_GUARD_S) for _ in range(12)]
    try:
        stalled[0].sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{")  # stops mid-body
        peak = 0
        # a valid request queued behind them is answered once the stalled ones time out
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(post, bright_server.url, valid_body())
            while not future.done():  # bounded by the request's own timeout
                peak = max(peak, handler_threads())
                wait([future], timeout=0.05)
            assert future.result()[0] == 200
        assert 1 <= peak <= 3
        assert all(closed_by_server(s) for s in stalled)
    finally:
        for s in stalled:
            s.close()


def test_bearer_token(start_server, monkeypatch):
    url = start_server(token="s3cret-token").url
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    code, answer = post(url, valid_body())
    assert code == 401 and TOKEN_ENV in answer["error"]
    assert post(url, valid_body(), {"Authorization": "Bearer s3cret-tokeX"})[0] == 401
    assert post(url, valid_body(), {"Authorization": "Basic s3cret-token"})[0] == 401
    assert post(url, valid_body(), {"Authorization": "Bearer s3cret-token"})[0] == 200
    with pytest.raises(ApexError, match=f"HTTP 401.*set {TOKEN_ENV}"):
        RemoteReward("brightness", url, FAST)
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    with pytest.raises(ApexError, match=f"token in {TOKEN_ENV} is wrong"):
        RemoteReward("brightness", url, FAST)
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    with RewardSuite([f"brightness@{url}"], config=RewardsConfig(remote=FAST)) as client:
        R, _ = client(images_8bit(2), None)
    assert torch.isfinite(R).all()


def test_token_must_fit_a_header():
    with pytest.raises(ApexError, match="printable ASCII"):
        make_server(RewardSuite(["brightness"]), "127.0.0.1", 0, token="two words")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"port": 70000}, "--port 70000"),
        ({"threads": 0}, "--threads 0"),
        ({"timeout_s": math.inf}, "--timeout inf"),
        ({"timeout_s": 0}, "--timeout 0"),
        ({"max_request_pixels": 0}, "--max-request-pixels 0"),
        ({"max_per_client": 0}, "--max-per-client 0"),
    ],
)
def test_limits_out_of_range_are_clear_errors(kwargs, match):
    port = kwargs.pop("port", 0)
    with pytest.raises(ApexError, match=match):
        make_server(RewardSuite(["brightness"]), "127.0.0.1", port, **kwargs)


class InfiniteSuite:
    """A suite whose reward misbehaves: +inf, -inf and NaN scores."""

    objectives = ["brightness"]

    def __call__(self, images, prompts):
        return torch.tensor([[math.inf], [-math.inf], [math.nan]]), {"brightness": {"x": [math.inf] * 3}}


def test_non_finite_scores_travel_as_null(bright_server):
    bright_server.suite = InfiniteSuite()
    req = urllib.request.Request(bright_server.url + "/score", data=valid_body(3), method="POST")
    with urllib.request.urlopen(req, timeout=HANG_GUARD_S) as resp:
        text = resp.read().decode()
    answer = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
    assert answer["scores"] == [[None], [None], [None]] and answer["info"]["brightness"]["x"] == [None] * 3


def test_ipv6_loopback(start_server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        srv = start_server(host="::1")
    except ApexError as exc:
        pytest.skip(f"no IPv6 loopback here ({exc})")
    assert srv.url.startswith("http://[::1]:")
    with urllib.request.urlopen(srv.url + "/health", timeout=HANG_GUARD_S) as resp:
        assert json.loads(resp.read())["objectives"] == ["brightness"]


# --- hostile clients: pixel budgets, trickled headers, one address holding every slot --------


def png_b64_of(width, height):
    return encode_png(Image.new("RGB", (width, height), (128, 128, 128)))


def test_decoded_pixels_per_request_are_bounded_from_the_headers(start_server, monkeypatch):
    import apexcli.rewards.server as server_module
    from test_score import huge_png_header

    srv = start_server(max_request_pixels=1000)
    two_small = json.dumps({"prompts": ["x"] * 2, "images": [png_b64_of(20, 20)] * 2}).encode()
    assert post(srv.url, two_small)[0] == 200  # 800 pixels
    decoded = []
    real_open = server_module.open_image
    monkeypatch.setattr(server_module, "open_image", lambda data, limit: decoded.append(data) or real_open(data, limit))
    # a few hundred bytes declaring 5000 x 5000 each: refused before a pixel is decoded
    bomb = base64.b64encode(huge_png_header(5000, 5000)).decode()
    code, answer = post(srv.url, json.dumps({"prompts": ["x"] * 2, "images": [bomb, bomb]}).encode())
    assert code == 413 and decoded == []
    assert "50000000 decoded pixels" in answer["error"] and "limit of 1000" in answer["error"]
    assert "--max-request-pixels" in answer["error"]
    with urllib.request.urlopen(srv.url + "/health", timeout=HANG_GUARD_S) as resp:
        assert json.loads(resp.read())["max_request_pixels"] == 1000


def test_a_client_splits_its_batch_to_fit_the_servers_pixel_limit(start_server):
    from apexcli.rewards.remote import pixel_groups

    assert pixel_groups([400, 400, 400], 1000) == [(0, 2), (2, 3)]
    assert pixel_groups([2000, 10], 1000) == [(0, 1), (1, 2)]  # too large alone: the server names its limit
    assert pixel_groups([400, 400], None) == [(0, 2)]
    srv = start_server(max_request_pixels=1000)
    images = [Image.new("RGB", (20, 20), (v, v, v)) for v in (0, 51, 255)]
    with RewardSuite([f"brightness@{srv.url}"], config=RewardsConfig(remote=FAST)) as client:
        R, _ = client(images, None)
    assert R[:, 0].tolist() == pytest.approx([0.0, 0.2, 1.0], abs=1e-6)


class Trickler:
    """A client that sends a request's headers one byte at a time and never finishes them;
    it stops (and closes) when told, when the server drops it, or after `budget` bytes."""

    def __init__(self, address, interval_s=0.05, budget=600):
        self.sock = socket.create_connection(address, timeout=HANG_GUARD_S)
        self.interval_s, self.budget = interval_s, budget
        self.stop = threading.Event()
        self.outcome = "running"  # then "dropped" (by the server), "exhausted" or "stopped"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        text = b"POST /score HTTP/1.0\r\nX-Padding: " + b"a" * self.budget
        try:
            for i in range(self.budget):
                if self.stop.wait(self.interval_s):
                    self.outcome = "stopped"
                    return
                self.sock.sendall(text[i : i + 1])
            self.outcome = "exhausted"
        except OSError:
            self.outcome = "dropped"
        finally:
            self.sock.close()  # an exhausted trickler leaves, so a server without the fix ends too

    def finish(self):
        self.stop.set()
        self.thread.join(HANG_GUARD_S)


@contextlib.contextmanager
def tricklers(srv, n, **options):
    started = [Trickler(srv.server_address[:2], **options) for _ in range(n)]
    try:
        yield started
    finally:
        for t in started:
            t.finish()


def test_the_deadline_covers_the_whole_request_not_each_read(start_server):
    srv = start_server(threads=2, timeout_s=0.5)
    with tricklers(srv, 1) as (slow,):
        slow.thread.join(HANG_GUARD_S)  # it ends when the server drops it, or when its bytes run out
        assert slow.outcome == "dropped"


def test_an_authorised_request_is_served_while_tokenless_clients_trickle(start_server):
    """40 connections trickling a byte at a time held all 32 slots: an authorised request waited
    until they stopped. Now the oldest of them is dropped whenever a connection waits for a slot."""
    srv = start_server(token="s3cret", threads=4, timeout_s=HANG_GUARD_S, header_grace_s=0.1)
    with tricklers(srv, 10) as slow:
        code, answer = post(srv.url, valid_body(), {"Authorization": "Bearer s3cret"})
        assert code == 200 and answer["scores"] == [[pytest.approx(128 / 255, abs=1e-6)]]
        assert "exhausted" not in [t.outcome for t in slow]  # answered while they were still trickling
        assert "dropped" in [t.outcome for t in slow]


def wait_for_authenticated(srv, n):
    """Until `n` connections of the server have sent their headers with the token (hang guard)."""
    for _ in range(int(HANG_GUARD_S / 0.01)):
        with srv._registry:
            if sum(c.authenticated for c in srv.connections.values()) >= n:
                return
        threading.Event().wait(0.01)
    pytest.fail(f"fewer than {n} authenticated connections")


def test_one_address_holds_at_most_max_per_client_slots(start_server):
    srv = start_server(token="s3cret", threads=8, timeout_s=HANG_GUARD_S, max_per_client=2, header_grace_s=0.1)
    host, port = srv.server_address[:2]
    auth = {"Authorization": "Bearer s3cret"}
    # an authenticated client whose body never comes: holds its slot, and is not dropped
    held = socket.create_connection((host, port), timeout=HANG_GUARD_S)
    try:
        held.sendall(b"POST /score HTTP/1.0\r\nAuthorization: Bearer s3cret\r\nContent-Length: 100\r\n\r\n{")
        wait_for_authenticated(srv, 1)
        with tricklers(srv, 1) as (slow,):
            # at the cap: the address's own trickling connection is dropped for it
            assert post(srv.url, valid_body(), auth)[0] == 200
            slow.thread.join(HANG_GUARD_S)
            assert slow.outcome == "dropped"
        second = socket.create_connection((host, port), timeout=HANG_GUARD_S)
        try:
            second.sendall(b"POST /score HTTP/1.0\r\nAuthorization: Bearer s3cret\r\nContent-Length: 100\r\n\r\n{")
            wait_for_authenticated(srv, 2)
            code, answer = post(srv.url, valid_body(), auth)  # two authenticated held: nothing to drop
            assert code == 503 and "at most 2 at once: apex serve --max-per-client" in answer["error"]
        finally:
            second.close()
    finally:
        held.close()
