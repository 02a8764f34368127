"""The training loop (loop), the pure jitted step shared with the ahead-of-time planner (step, aot), schedules,
checkpoints and snapshots, metrics, the live probe, peak FLOP/s, sharding and the host allocator settings."""
