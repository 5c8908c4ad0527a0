"""Stead: durable execution for AI products."""
