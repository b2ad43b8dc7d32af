"""Pictures of attention (matplotlib, imported lazily by each function)."""
