"""Publishing a version to serving engines before an alias moves: a directory target, and two real
`ctloop serve` replicas through vLLM's runtime LoRA API (one stopped: reported, and the promotion
refused with nothing changed, or allowed with `publish.require: 1`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from ctloop.config import PublishConfig, PublishTarget
from ctloop.errors import RegistryError
from ctloop.registry.client import CHALLENGER, CHAMPION
from ctloop.registry.promotion import champion_history, offer_as_challenger, promote, rollback
from ctloop.registry.publishing import make_publisher, publication_status
from ctloop.serving.server import create_app, serve_in_background
from ctloop.serving.service import Serving
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace
from shadow_helpers import register_versions, serving_config

pytestmark = pytest.mark.slow
TOKEN = "publish-s3cret"


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [random_adapter(tiny_base, root / f"a{seed}", seed) for seed in (1, 2, 3)]


def test_a_directory_target_gets_an_atomic_copy_before_the_alias_moves(tiny_base, adapters, tmp_path):
    config = serving_config(tiny_base, tmp_path / "ws")
    registry = register_versions(config, adapters)  # v1 champion, v2 challenger, v3
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    publisher = make_publisher(
        PublishConfig(targets=[PublishTarget(kind="directory", path=str(shelf))]), registry, Workspace(config.workspace)
    )
    assert publisher.publish(1).enough("all")  # the champion as it was published before
    assert publisher.publish(2).enough("all")  # a version that will be neither champion nor challenger
    offer_as_challenger(registry, 3, promote_first=False, publisher=publisher)
    assert (shelf / "srv-v3" / "adapter_config.json").is_file() and registry.alias(CHALLENGER) == 3
    promote(registry, by="t", note="v3", publisher=publisher)
    assert sorted(p.name for p in shelf.iterdir()) == ["srv-v1", "srv-v3"]  # v1 stays: the previous champion; v2 goes
    assert [v[:2] for v in publication_status(registry, 3).values()] == ["ok"]
    rollback(registry, by="t", publisher=publisher)
    assert registry.alias(CHAMPION) == 1 and (shelf / "srv-v1").is_dir()
    config_file = tmp_path / "ctloop.yaml"
    config_file.write_text(
        yaml.safe_dump(
            config.model_dump(mode="json") | {"publish": {"targets": [{"kind": "directory", "path": str(shelf)}]}}
        )
    )
    published = subprocess.run(
        [sys.executable, "-m", "ctloop", "publish", "2", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert published.returncode == 0 and "published v2 to 1 of 1 replicas" in published.stderr, published.stderr
    assert (shelf / "srv-v2" / "adapter_config.json").is_file()  # `ctloop publish` moves no alias, retires nothing
    status = subprocess.run(
        [sys.executable, "-m", "ctloop", "status", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1/1 replicas" in status.stdout, status.stdout


def test_two_ctloop_replicas_load_the_version_first_and_a_down_one_stops_the_promotion(
    tiny_base, adapters, tmp_path, monkeypatch
):
    monkeypatch.setenv("CTLOOP_ADMIN_TOKEN", TOKEN)
    config = serving_config(tiny_base, tmp_path / "ws", shadow={"enabled": False})
    registry = register_versions(config, adapters)
    workspace = Workspace(config.workspace)
    with serve_in_background(create_app(config, workspace)) as replica_a:
        with serve_in_background(create_app(config, workspace)) as replica_b:
            targets = [PublishTarget(kind="ctloop", urls=[replica_a, replica_b], token_env="CTLOOP_ADMIN_TOKEN")]
            publisher = make_publisher(PublishConfig(targets=targets, attempts=2), registry, workspace)
            promote(registry, 2, by="t", note="both replicas", publisher=publisher)
            for url in (replica_a, replica_b):
                assert "srv-v2" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
            assert all(v.startswith("ok") for v in publication_status(registry, 2).values())
        # replica B is down now: with publish.require "all" the promotion stops, nothing moved
        with pytest.raises(RegistryError, match=rf"cannot become champion.*{replica_b}.*unreachable"):
            promote(registry, 3, by="t", note="B is down", publisher=publisher)
        assert registry.alias(CHAMPION) == 2 and champion_history(registry) == [1, 2]
        port_b = replica_b.rsplit(":", 1)[1]
        [outcome_b] = [v for k, v in publication_status(registry, 3).items() if k.endswith(port_b)]
        assert outcome_b.startswith("failed") and "unreachable" in outcome_b
        lenient = make_publisher(PublishConfig(targets=targets, require=1, attempts=1), registry, workspace)
        promote(registry, 3, by="t", note="one replica is enough", publisher=lenient)
        assert registry.alias(CHAMPION) == 3
        assert "srv-v3" in {m["id"] for m in httpx.get(f"{replica_a}/v1/models").json()["data"]}


def test_the_load_api_confines_paths_and_names(tiny_base, adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("CTLOOP_ADMIN_TOKEN", TOKEN)
    roots = tmp_path / "allowed"
    for folder, source in (("srv-v3", adapters[2]), ("squatter", adapters[0])):
        (roots / folder).mkdir(parents=True)
        for item in source.iterdir():
            (roots / folder / item.name).write_bytes(item.read_bytes())
    config = serving_config(tiny_base, tmp_path / "ws", serve={"adapter_roots": [str(roots)]})
    register_versions(config, adapters)  # v1 champion, v2 challenger, v3 registered without a role
    auth = {"authorization": f"Bearer {TOKEN}"}
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:

        def load(body, headers=auth):
            return httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers, timeout=60)

        assert load({"lora_name": "srv-v3", "lora_path": str(roots / "srv-v3")}, headers={}).status_code == 401
        refused = [
            load({"lora_name": "srv-v3", "lora_path": str(adapters[2])}),  # outside the roots
            load({"lora_name": "srv-v3", "lora_path": str(roots / "srv-v3" / ".." / ".." / adapters[2].name)}),
            load({"lora_name": "other-v3", "lora_path": str(roots / "srv-v3")}),
            load({"lora_name": "srv-v3", "lora_path": str(roots)}),  # no adapter there
            # #24 item 3: a folder under a registry version's name must hold that version's files
            load({"lora_name": "srv-v3", "lora_path": str(roots / "squatter")}),
        ]
        assert [r.status_code for r in refused] == [400, 400, 400, 400, 400]
        assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in refused)
        assert "other adapter files than registry version 3" in refused[-1].json()["error"]["message"]
        # ... and a version the registry does not hold yet cannot be squatted on before it arrives
        future = load({"lora_name": "srv-v9", "lora_path": str(roots / "squatter")})
        assert future.status_code == 404 and "no version 9" in future.json()["error"]["message"]
        escaping = roots / "escaping"  # #24 item 12: a folder inside the roots, a file pointing outside
        escaping.mkdir()
        for item in adapters[2].iterdir():
            (escaping / item.name).symlink_to(item)
        leaked = load({"lora_name": "srv-v3", "lora_path": str(escaping)})
        assert leaked.status_code == 400 and "symlinks that leave serve.adapter_roots" in leaked.text
        ok = load({"lora_name": "srv-v3", "lora_path": str(roots / "srv-v3")})
        assert ok.status_code == 200 and "added successfully" in ok.text
        again = load({"lora_name": "srv-v3", "lora_path": str(roots / "srv-v3")})  # vLLM: 400, already loaded
        assert again.status_code == 400 and "already been loaded" in again.text
        assert "srv-v3" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        answer = httpx.post(f"{url}/v1/completions", json={"model": "srv-v3", "prompt": "x"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"] == "srv-v3"
        busy = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "srv-v1"}, headers=auth)
        assert busy.status_code == 409  # the champion is not unloaded behind the registry's back
        gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "srv-v3"}, headers=auth)
        assert gone.status_code == 200 and "srv-v3" not in json.dumps(httpx.get(f"{url}/v1/models").json())
        unknown = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "srv-v3"}, headers=auth)
        assert unknown.status_code == 404  # as vLLM answers for a name it does not hold


def test_a_pinned_load_survives_concurrent_role_syncs(tiny_base, adapters, tmp_path):
    """The registry watch frees versions without a role; it must never free one that
    /v1/load_lora_adapter is loading at that moment (CI once saw the pin lost this way)."""
    config = serving_config(tiny_base, tmp_path / "ws")
    register_versions(config, [*adapters, adapters[1]])  # v3 and v4 have no role
    serving = Serving(config, Workspace(config.workspace))

    async def scenario() -> list[bool]:
        await serving.start()
        unload_except = serving.backend.unload_except

        def slow_unload_except(keep):  # a sync whose unload thread is scheduled late, as under load
            time.sleep(0.3)
            unload_except(keep)

        serving.backend.unload_except = slow_unload_except
        try:
            kept = []
            roles = serving.role_sync
            for version, files in ((3, adapters[2]), (4, adapters[1])):
                syncs = [roles.sync() for _ in range(4)]
                await asyncio.gather(*syncs[:2], roles.load_pinned(version, files), *syncs[2:])
                kept.append(version in serving.backend.loaded)
                await asyncio.gather(roles.sync(), roles.unload_pinned(version), roles.sync())
                kept.append(version not in serving.backend.loaded)
            return kept
        finally:
            await serving.stop()

    assert asyncio.run(scenario()) == [True] * 4


class _Replica:
    """A misbehaving replica on loopback (raw sockets): `drip` sends its head, then a byte a second;
    `huge` answers 400 with a 50 MB body; `echo` answers 400 with the request's own head."""

    def __init__(self, mode: str):
        import socket
        import threading

        self.mode, self.sent = mode, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection) -> None:
        with connection:
            head = connection.recv(65536)
            try:
                if self.mode == "drip":
                    connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                    for _ in range(1000):
                        if self.stop.is_set():
                            return
                        connection.sendall(b"x")
                        time.sleep(1)
                elif self.mode == "huge":
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 50000000\r\n\r\n")
                    block = b"e" * 65536
                    while self.sent < 50_000_000:
                        connection.sendall(block)
                        self.sent += len(block)
                else:
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n" % len(head) + head)
            except OSError:
                return  # the client hung up

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("mode", ["drip", "huge", "echo"])
def test_publishing_to_a_misbehaving_replica_is_bounded_and_discreet(tiny_base, adapters, tmp_path, monkeypatch, mode):
    """#24 items 6-7: a replica dripping a byte a second held `ctloop publish` past 200 s (httpx's
    timeout restarts with every byte), a 400 MB error body drove it to 1.46 GB, and a replica
    echoing the request headers got the bearer token printed and stored in the version's tags."""
    monkeypatch.setenv("REPLICA_TOKEN", "vllm-SECRET-token-7f3a9c1e5b")
    config = serving_config(tiny_base, tmp_path / "ws")
    registry = register_versions(config, adapters[:1])
    replica = _Replica(mode)
    try:
        urls = [replica.url.replace("http://", "http://ops:hunter2@")] + ([replica.url] if mode == "echo" else [])
        target = PublishTarget(
            kind="vllm", urls=urls, path="/srv/{name}-v{version}", token_env="REPLICA_TOKEN", timeout_s=2
        )
        publisher = make_publisher(PublishConfig(targets=[target], attempts=2), registry, Workspace(config.workspace))
        result = publisher.publish(1)
    finally:
        replica.close()
    outcome = result.outcomes[-1]
    assert not any(o.ok for o in result.outcomes)
    if mode == "drip":
        assert "no complete answer within timeout_s=2" in outcome.detail
    if mode == "huge":
        # The client stopped reading at its cap (1 MB an attempt) and hung up: reading it all would
        # take 50 MB an attempt, 100 MB for the two. What else left the replica waits in loopback
        # socket buffers, which grow to several MB under load (14.5 MB over the two attempts, seen
        # on a loaded 2-core machine), so the bound is a quarter of everything, not the cap.
        assert replica.sent < 25_000_000
    stored = json.dumps(publication_status(registry, 1)) + " ".join(o.detail + o.target for o in result.outcomes)
    assert "vllm-SECRET-token-7f3a9c1e5b" not in stored and "hunter2" not in stored
    if mode == "echo":  # the replica echoed our Authorization header: the token, or the URL's user:password
        assert "Bearer ***" in result.outcomes[1].detail and "Basic ***" in result.outcomes[0].detail
        assert "b3BzOmh1bnRlcjI" not in stored  # base64 of ops:hunter2


def test_a_directory_target_replaces_stale_folders_and_refuses_symlinks(tiny_base, adapters, tmp_path):
    """#24 item 8: a stale folder or a symlink under the version's name was reported as published."""
    from ctloop.fileio import adapter_digest

    config = serving_config(tiny_base, tmp_path / "ws")
    registry = register_versions(config, adapters[:2])
    shelf = tmp_path / "shelf"
    (shelf / "srv-v1").mkdir(parents=True)
    (shelf / "srv-v1" / "adapter_config.json").write_text('{"foreign": true}')
    (shelf / "srv-v2").symlink_to(adapters[0])  # points at v1's files
    publisher = make_publisher(
        PublishConfig(targets=[PublishTarget(kind="directory", path=str(shelf))]), registry, Workspace(config.workspace)
    )
    replaced = publisher.publish(1)
    assert replaced.outcomes[0].ok and "replaced a stale folder" in replaced.outcomes[0].detail
    assert adapter_digest(shelf / "srv-v1") == adapter_digest(adapters[0])
    refused = publisher.publish(2)
    assert not refused.outcomes[0].ok and "symlink" in refused.outcomes[0].detail
    assert publisher.publish(1).outcomes[0].detail.startswith("already in")
    assert not list(shelf.glob(".*"))  # no partial or stale folder left behind
