"""Training over several processes: FSDP2 sharding of the actor and a worker group the driver's step loop
calls like a single actor."""
