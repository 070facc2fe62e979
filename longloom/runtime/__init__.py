"""Process setup below every other floor: who this process is, distributed init, device, allocator, op builds."""
