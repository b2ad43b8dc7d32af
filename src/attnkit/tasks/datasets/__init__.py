"""Readers for the real data sets the recipes use (read by path, never copied or downloaded)."""
