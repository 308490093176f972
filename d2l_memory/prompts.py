"""The two prompt formats the system is built around, written once.

- `CHUNK_TEMPLATE`: how the hypernetwork's encoder reads a document chunk (one user turn).
- `QA_TEMPLATE`: the base model with a document in its prompt: the meta-training teacher, the
  `context`/`hybrid` chat modes and the in-context reference of the evaluation. At 135M parameters
  the format matters: with the context first and this instruction the model answers from it; formats
  that put the question first make it ignore the question.
"""

CHUNK_TEMPLATE = "Context: {document}"
QA_TEMPLATE = "Context: {context}\n\nUsing the context, answer briefly: {question}"
