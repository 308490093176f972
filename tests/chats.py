"""Chats and settings the engine tests share (transformers and vLLM must be compared on the same ones)."""

from d2l_memory.engines import GenerationParams

BASE = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
HELLO = [{"role": "user", "content": "Hi"}]
COLOR = [{"role": "system", "content": "Answer in one sentence."},
         {"role": "user", "content": "What color is the sky?"}]
SHORT = GenerationParams(max_new_tokens=10)
