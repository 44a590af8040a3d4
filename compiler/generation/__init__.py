"""Text generation: prefill and decode programs, their export, parity and timing."""
