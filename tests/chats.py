"""Chats and settings the engine tests share (transformers and vLLM must be compared on the same ones)."""

from d2l_memory.engines import GenerationParams

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
# After the call and its result: an answer is due, and `none` must keep the model from writing another call.
ANSWERED_ORDER = [*ASK_ORDER, {"role": "assistant", "content": ORDER_CALL},
                  {"role": "tool", "content": '{"order": 1234, "status": "shipped", "carrier": "DHL"}'}]
