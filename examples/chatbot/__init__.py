"""A chatbot that remembers its users across conversations: a terminal face and a web face over one
`Conversation` (examples/chatbot/conversation.py). See docs/chatbot.md."""
