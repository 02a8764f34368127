"""A run directory as one object (run.Run), its versioned results store (store, records), the scoring of its
snapshots into the store (scoring), and the results read back from it (results)."""
