"""Recipes: end-to-end jobs built on attnkit's modules (translation, speech, vision, graphs, language models)."""
