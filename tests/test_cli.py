"""The `d2l-memory` CLI end to end: the real model, hypernetwork and LanceDB store, through typer's runner.

Every memory command builds its own `D2LMemory` (a few seconds each), so the module shares one store and
keeps the commands that load the model few; the bad-input cases fail before the model loads.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import torch
from typer.testing import CliRunner, Result

from d2l_memory.cli import app

FACT = "Alice's favorite color is teal."
QUESTION = "What is Alice's favorite color?"
TRANSCRIPT = [{"role": "user", "content": "I'm Bob and I keep bees."}, ["assistant", "Bees are great, Bob!"]]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cli-store"))


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input, env=env)


@pytest.fixture(scope="module")
def absorbed(store, tmp_path_factory) -> dict[str, dict]:
    notes = tmp_path_factory.mktemp("input") / "notes.txt"
    notes.write_text(FACT + "\n")
    alice = run("absorb", str(notes), "--user", "alice", "--metadata", '{"source": "notes"}', "--store", store,
                "--json")
    assert alice.exit_code == 0, alice.output
    bob = run("absorb", "-", "--user", "bob", "--kind", "chat", "--session", "s1", "--store", store, "--json",
              input=json.dumps(TRANSCRIPT))
    assert bob.exit_code == 0, bob.output
    [alice_record], [bob_record] = json.loads(alice.stdout), json.loads(bob.stdout)
    return {"alice": alice_record, "bob": bob_record}


def test_absorb_a_file_and_stdin_as_json(absorbed):
    alice, bob = absorbed["alice"], absorbed["bob"]
    assert alice["user_id"] == "alice" and alice["kind"] == "document" and alice["text"] == FACT + "\n"
    assert alice["metadata"] == {"source": "notes"} and alice["n_chunks"] == 1 and alice["n_tokens"] > 5
    assert datetime.fromisoformat(alice["created_at"]).tzinfo is not None
    # A JSON message list given as a chat is read as a transcript: turns become "Role: content" lines.
    assert bob["kind"] == "chat" and bob["session_id"] == "s1"
    assert bob["text"] == "User: I'm Bob and I keep bees.\nAssistant: Bees are great, Bob!"


def test_recall_finds_a_memory_for_its_user_only(store, absorbed):
    hits = json.loads(run("recall", QUESTION, "--user", "alice", "-k", "2", "--store", store, "--json").stdout)
    assert hits[0]["id"] == absorbed["alice"]["id"] and hits[0]["score"] > 0
    others = json.loads(run("recall", QUESTION, "--user", "bob", "--store", store, "--json").stdout)
    assert [h["id"] for h in others] == [absorbed["bob"]["id"]]


def test_chat_message_answers_from_memory(store, absorbed):
    result = run("chat", "--user", "alice", "--mode", "context", "--message", QUESTION, "--max-new-tokens", "24",
                 "--store", store)
    assert result.exit_code == 0, result.output
    assert "teal" in result.stdout.lower()


def test_chat_without_a_tty_answers_each_stdin_line_and_exits_at_eof(store, absorbed):
    result = run("chat", "--user", "alice", "--mode", "none", "--max-new-tokens", "4", "--store", store, "--json",
                 input="Hello!\n\n")
    assert result.exit_code == 0, result.output
    [turn] = [json.loads(line) for line in result.stdout.splitlines()]
    assert turn["message"] == "Hello!" and turn["mode"] == "none" and isinstance(turn["answer"], str)


def test_library_errors_are_one_red_line_and_exit_2(store, absorbed):
    result = run("recall", "color?", "--user", "x' OR '1'='1", "--store", store)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "not allowed" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_forget_user_removes_their_memories_and_composed_adapters(store, absorbed):
    from d2l_memory.compose import ComposedCache, cache_root_for

    cache = ComposedCache(cache_root_for(store))
    assert run("chat", "--user", "alice", "--mode", "adapter", "-m", QUESTION, "--max-new-tokens", "2",
               "--store", store).exit_code == 0
    holding = [n for n in cache.names() if absorbed["alice"]["id"] in {m for m, _ in cache.recipe(n).members}]
    assert holding  # the chat composed alice's memory into an adapter
    result = run("forget", "--user", "alice", "--yes", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"forgotten": 1}
    assert json.loads(run("list", "--user", "alice", "--store", store, "--json").stdout) == []
    assert not set(holding) & set(cache.names())


def test_store_commands_do_not_load_the_model(store, absorbed, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for where in ("d2l_memory.models.load_model", "d2l_memory.memory.load_model",
                  "d2l_memory.d2l.DocToLoRA.from_pretrained"):
        monkeypatch.setattr(where, no_model)
    bob = absorbed["bob"]["id"]
    for args in (["list", "--user", "bob"], ["recall", "bees", "--user", "bob"], ["forget", "--user", "nobody", "-y"],
                 ["optimize"]):
        result = run(*args, "--store", store, "--json")
        assert result.exit_code == 0, result.output

    def forget(*args: str) -> dict:
        result = run("forget", "--id", bob, *args, "--store", store, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert forget("--user", "alice") == {"forgotten": 0}  # not alice's: nothing to confirm, nothing forgotten
    assert forget("--user", "bob", "--yes") == {"forgotten": 1}
    assert json.loads(run("list", "--user", "bob", "--store", store, "--json").stdout) == []


@pytest.mark.parametrize(("args", "stdin", "names"), [
    (["absorb", "{empty}", "--user", "alice"], None, ["empty.txt", "empty"]),
    (["absorb", "-", "--user", "alice"], " \n", ["stdin", "whitespace"]),
    (["absorb", "-", "--user", "alice", "--kind", "diary"], "hi", ["--kind", "diary"]),
    (["absorb", "{missing}", "--user", "alice"], None, ["no such file", "missing.txt"]),
    (["absorb", "-", "--user", "alice", "--metadata", "{oops"], "hi", ["--metadata", "JSON"]),
    (["chat", "--user", "alice", "--mode", "telepathy", "-m", "hi"], None, ["--mode", "telepathy"]),
    (["forget", "--yes"], None, ["pass --user"]),
    (["eval", "--tasks", "facts,astrology"], None, ["unknown task", "astrology"]),
    (["bench", "gate", "--quick", "--no-such-option"], None, ["unrecognized arguments", "--no-such-option"]),
    (["bench", "all", "--data", "runs/data"], None, ["belong to one benchmark"]),
], ids=["empty-file", "blank-stdin", "unknown-kind", "missing-file", "bad-metadata", "unknown-mode", "no-target",
        "unknown-task", "bench-option-reaches-the-benchmark", "bench-all-options"])
def test_bad_input_exits_2_naming_the_problem(tmp_path, args, stdin, names):
    (tmp_path / "empty.txt").write_text("")
    args = [a.replace("{empty}", str(tmp_path / "empty.txt")).replace("{missing}", str(tmp_path / "missing.txt"))
            for a in args]
    result = run(*args, input=stdin, env={"D2L_MEMORY_STORE": str(tmp_path / "store")})
    assert result.exit_code == 2
    assert all(name in result.output for name in names), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "store").exists()  # refused before anything was opened


class FakeServer:
    """Stands in for `VLLMServer`: starts at once, then the user presses Ctrl-C."""

    last: FakeServer | None = None

    def __init__(self, config, cache=None) -> None:
        self.config, self.log_path, self.stopped = config, "/tmp/fake-vllm.log", False
        FakeServer.last = self

    def start(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def running(self) -> bool:
        raise KeyboardInterrupt

    def stop(self) -> None:
        self.stopped = True


def test_serve_builds_the_server_config_and_stops_it_on_ctrl_c(monkeypatch):
    monkeypatch.setattr("d2l_memory.cli._vllm_installed", lambda: True)
    monkeypatch.setattr("d2l_memory.engines.vllm_server.VLLMServer", FakeServer)
    result = run("serve", "--port", "8123", "--store", "/data/memories", "--vllm-arg=--enforce-eager")
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:8123/v1" in result.stdout
    config = FakeServer.last.config
    assert config.port == 8123 and config.model == "smollm2-135m-instruct" and config.extra_args == ("--enforce-eager",)
    assert config.env == {"D2L_MEMORY_STORE_URI": "/data/memories"} and FakeServer.last.stopped
    assert config.tool_call_parser == "hermes" and config.chat_template is None  # tool calling is on by default
    assert run("serve", "--tool-call-parser", "none").exit_code == 0 and FakeServer.last.config.tool_call_parser is None
    bad = run("serve", "--max-lora-rank", "7")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: max_lora_rank: ") and "Traceback" not in bad.output


def test_optimize_keeps_every_memory_and_drops_old_versions(tmp_path):
    from d2l_memory.lora import LoRA
    from d2l_memory.store.store import MemoryStore

    def lora(seed: int) -> LoRA:
        gen = torch.Generator().manual_seed(seed)
        a, b = torch.randn(2, 8, generator=gen), torch.randn(4, 2, generator=gen)
        return LoRA({"model.layers.0.mlp.down_proj": (a, b)}, base_model="tiny", hypernet="h1")

    vectors = torch.nn.functional.normalize(torch.randn(3, 384, generator=torch.Generator().manual_seed(0)), dim=1)
    with MemoryStore(tmp_path) as memories:
        ids = [memories.add("alice", lora(i), vector=vectors[i].numpy()).id for i in range(3)]
    result = run("optimize", "--store", str(tmp_path), "--keep-minutes", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["memories"] == 3 and report["versions_after"] < report["versions_before"]
    with MemoryStore(tmp_path) as memories:
        assert {m.id for m in memories.list("alice")} == set(ids)
        stored, original = memories.get_adapter(ids[1], base_model="tiny", hypernet="h1"), lora(1)
        for name, (a, b) in original.weights.items():
            assert torch.allclose(stored.weights[name][0].float(), a, rtol=1e-2) and \
                torch.allclose(stored.weights[name][1].float(), b, rtol=1e-2)


def test_optimize_needs_an_existing_store(tmp_path):
    result = run("optimize", "--store", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "no memory store at" in result.output
    assert not (tmp_path / "missing").exists()
