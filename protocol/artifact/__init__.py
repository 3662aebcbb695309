"""What moves between roles as files: expert deltas, their wire encodings and untrusted reader, checkpoints."""
