"""Conversation memory: stored conversations, titles, rolling summaries, sessions."""
