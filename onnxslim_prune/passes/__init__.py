"""Analysis passes (trace, score, plan: plain data) and transformation passes (apply, merge, reconstruct)."""
