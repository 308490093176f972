"""langchain-tests' standard integration suite for `ChatD2L`, on the real 135M model (CPU).

Capabilities the base model does not have are declared off, so their tests skip with the suite's own
reasons: tool calling (and with it tool choice, structured output, the agent loop), JSON mode, image /
PDF / audio / video inputs, and per-call model override (one base model serves every call).
"""

import pytest
from langchain_d2l import ChatD2L
from langchain_tests.integration_tests import ChatModelIntegrationTests

USER = "standard-tests"


class TestChatD2LIntegration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _memory(self, memory):
        if not memory.list(USER):  # one memory, so greetings and haiku requests exercise recall and gating
            memory.absorb("Sam likes short poems, especially haikus about the sea.", user_id=USER)
        self.memory = memory

    @property
    def chat_model_class(self) -> type[ChatD2L]:
        return ChatD2L

    @property
    def chat_model_params(self) -> dict:
        return {"memory": self.memory, "user_id": USER, "mode": "adapter", "max_tokens": 8}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False
