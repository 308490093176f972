"""A support agent with long-term memory: an order-lookup tool, a policy document it is given, and a customer's
preferences and earlier tool results recalled in later threads. `python -m examples.agent`; see
docs/agent.md."""
