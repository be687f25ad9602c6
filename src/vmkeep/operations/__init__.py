"""Operations: backup, restore, export, prune — one module each, over repository and connectors."""
