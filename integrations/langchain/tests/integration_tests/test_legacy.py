"""`D2LClassicMemory`, the legacy `langchain_classic` `BaseMemory` adapter (extra `classic`)."""

import pytest

pytest.importorskip("langchain_classic", reason="needs the classic extra: pip install 'langchain-d2l[classic]'")

from langchain_d2l import D2LClassicMemory


def test_classic_memory_saves_loads_and_clears(memory):
    classic = D2LClassicMemory(memory=memory, user_id="legacy-gina")
    assert classic.memory_variables == ["history"]
    assert classic.load_memory_variables({"input": "What is my dog called?"}) == {"history": ""}
    classic.save_context({"input": "My dog is called Pixel."}, {"output": "Pixel is a great name!"})
    loaded = classic.load_memory_variables({"input": "What is my dog called?"})
    assert loaded == {"history": "User: My dog is called Pixel.\nAssistant: Pixel is a great name!"}
    with pytest.raises(ValueError, match="set input_key"):
        classic.load_memory_variables({"a": "1", "b": "2"})
    classic.clear()
    assert memory.list("legacy-gina") == []
