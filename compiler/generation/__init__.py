"""Text generation: one decoder program over a KV cache, its export, parity and timing."""
