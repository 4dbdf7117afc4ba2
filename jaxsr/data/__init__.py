"""Host-side image input/output, resizing that matches the reference stacks, degradations."""
