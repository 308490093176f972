"""langchain-tests' standard integration suite for `ChatD2L`, on the real 135M model (CPU).

Tool calling, tool choice and structured output are on: the engine constrains answers to well-formed calls.
Their tests get a token budget a call fits in (`CALL_BUDGET`); the others keep a short one, so the suite
stays quick. Expected to fail (docs/langchain.md has the results):

- `test_agent_loop` leaves `tool_choice` at `auto`, and the 135M model does not decide to call a tool;
- the structured-output tests ask for a joke about cats, and the model's greedy joke repeats one sentence
  ("The cat was a cat. ...") until the budget ends (it does so without any constraint too), so the call's
  JSON is never closed.

Declared off, so their tests skip with the suite's own reasons: JSON mode, image / PDF / audio / video
inputs, and per-call model override (one base model serves every call).
"""

from typing import Literal

import pytest
from langchain_d2l import ChatD2L
from langchain_tests.integration_tests import ChatModelIntegrationTests

USER = "standard-tests"
CALL_BUDGET = 64  # tokens: a call's fixed JSON is about 20, a joke's two strings take most of the rest
CALL_TESTS = ("tool", "structured", "agent_loop", "bind_runnables")
SCHEMA_TYPES = ["pydantic", "typeddict", "json_schema"]
ENDLESS_JOKE = pytest.mark.xfail(reason="the 135M model's greedy joke repeats a sentence until the token budget "
                                 "ends, so the call is never closed")


class TestChatD2LIntegration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _memory(self, memory):
        if not memory.list(USER):  # one memory, so greetings and haiku requests exercise recall and gating
            memory.absorb("Sam likes short poems, especially haikus about the sea.", user_id=USER)
        self.memory = memory

    @pytest.fixture
    def model(self, request) -> ChatD2L:
        budget = CALL_BUDGET if any(word in request.node.name for word in CALL_TESTS) else 8
        return ChatD2L(**{**self.standard_chat_model_params, **self.chat_model_params, "max_tokens": budget})

    @property
    def chat_model_class(self) -> type[ChatD2L]:
        return ChatD2L

    @property
    def chat_model_params(self) -> dict:
        return {"memory": self.memory, "user_id": USER, "mode": "adapter"}

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False

    @pytest.mark.xfail(reason="tool_choice='auto': the 135M model answers in text instead of calling the tool",
                       strict=True)
    def test_agent_loop(self, model: ChatD2L) -> None:
        super().test_agent_loop(model)

    @ENDLESS_JOKE
    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
    def test_structured_output(self, model: ChatD2L,
                               schema_type: Literal["pydantic", "typeddict", "json_schema"]) -> None:
        super().test_structured_output(model, schema_type)

    @ENDLESS_JOKE
    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
    async def test_structured_output_async(self, model: ChatD2L,
                                           schema_type: Literal["pydantic", "typeddict", "json_schema"]) -> None:
        await super().test_structured_output_async(model, schema_type)

    @ENDLESS_JOKE
    def test_structured_output_pydantic_2_v1(self, model: ChatD2L) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @ENDLESS_JOKE
    def test_structured_output_optional_param(self, model: ChatD2L) -> None:
        super().test_structured_output_optional_param(model)
