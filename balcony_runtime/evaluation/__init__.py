"""Per-exit quality against the full model, beside naive early exit and layer dropping."""
