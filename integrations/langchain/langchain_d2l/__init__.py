"""LangChain / LangGraph integration for d2l-memory: a thin layer over `d2l_memory`, no memory logic."""

__version__ = "0.1.0"
