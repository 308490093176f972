"""langchain-tests' standard unit suite for `ChatD2L`."""

import pytest
from langchain_d2l import ChatD2L
from langchain_tests.unit_tests import ChatModelUnitTests


class TestChatD2LUnit(ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _memory(self, memory):
        self.memory = memory

    @property
    def chat_model_class(self) -> type[ChatD2L]:
        return ChatD2L

    @property
    def chat_model_params(self) -> dict:
        return {"memory": self.memory, "user_id": "unit-tests"}
