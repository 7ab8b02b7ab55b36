"""Sending a prompt to one expert: the MiniLM encoder and the router trained on a partition."""
