"""Memories: which keys fire, what values write, second-moment statistics."""
