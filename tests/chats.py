"""Chats, settings and adapters the engine tests share (transformers and vLLM must be compared on the same
ones)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from d2l_memory.engines import GenerationParams
from d2l_memory.lora import LoRA

BASE = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
HELLO = [{"role": "user", "content": "Hi"}]
COLOR = [{"role": "system", "content": "Answer in one sentence."},
         {"role": "user", "content": "What color is the sky?"}]
SHORT = GenerationParams(max_new_tokens=10)

# A tool, a question it answers, and the call the engines write for it (tests/test_tool_calls.py, test_vllm.py).
ORDER = {"type": "function", "function": {
    "name": "lookup_order", "description": "Look up an order's shipping status by its number.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]}}}
ASK_ORDER = [{"role": "user", "content": "Where is my order 1234?"}]
ORDER_CALL = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": 1234}}\n</tool_call>'
CALL_ORDER = GenerationParams(max_new_tokens=40, tools=(ORDER,), tool_choice="required", parallel_tool_calls=False)
# The same question answered as one JSON value of a schema (structured output), and what the engines write.
AS_ORDER_JSON = GenerationParams(max_new_tokens=40, json_schema={
    "type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]})
ORDER_JSON = '{"order_id": 1234}'
# After the call and its result: an answer is due, and `none` must keep the model from writing another call.
ANSWERED_ORDER = [*ASK_ORDER, {"role": "assistant", "content": ORDER_CALL},
                  {"role": "tool", "content": '{"order": 1234, "status": "shipped", "carrier": "DHL"}'}]


def down_proj_lora(seed: int, std: float, scale: float = 1.0) -> LoRA:
    """A random rank-8 adapter on every MLP down_proj of the base model (strong enough at std ~0.04 to change
    greedy answers)."""
    g = torch.Generator().manual_seed(seed)
    return LoRA({f"model.layers.{i}.mlp.down_proj": (torch.randn(8, 1536, generator=g) * std,
                                                      torch.randn(576, 8, generator=g) * std)
                 for i in range(30)}, scale=scale, base_model=BASE)


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps the test output clean (no access log)."""

    def log_message(self, *args: object) -> None:
        pass


class LoopbackServer:
    """An HTTP server on a free 127.0.0.1 port, answering with `handler` in a thread until `close`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
