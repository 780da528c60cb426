"""Drawing helpers shared by experiments' renderers (matplotlib figures, circuitsvis views)."""
