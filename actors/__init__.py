"""Model actors: one module per role; each loads its model once and maps a batch to a batch."""
