"""Pure IR -> IR functions. Order: lower -> infer_shapes -> legality -> tile -> fuse -> plan."""
