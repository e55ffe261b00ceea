"""What makes head training scale: grouped attention calls, a chunked loss, anchor placement,
the data readers and data-parallel ranks. The method itself is in diffusion_head.py."""
